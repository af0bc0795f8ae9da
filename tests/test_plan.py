"""The planner: aspect buckets, budgets, shards, determinism, padding figures, same boxes."""

import json

import numpy as np
import onnx
import pyarrow as pa
import pytest

from bulkdet.run.plan import input_shapes, letterbox, plan, plan_batches
from bulkdet.store.parts import read_detections
from conftest import make_images


def manifest(sizes, shards=None, ids=None) -> pa.Table:
    n = len(sizes)
    ids = list(range(n)) if ids is None else ids
    return pa.table({
        "image_id": pa.array(ids, pa.int64()),
        "shard": pa.array(shards if shards is not None else [0] * n, pa.int32()),
        "width": pa.array([w for w, _ in sizes], pa.int32()),
        "height": pa.array([h for _, h in sizes], pa.int32()),
        "path": [f"img{i}.jpg" for i in ids],
        "key": [i.to_bytes(4, "big") for i in ids],
    })


@pytest.mark.parametrize("size, imgsz, bucket", [
    ((1920, 1080), 640, (384, 640)),  # 16:9: 360 rows rounded up to 384
    ((640, 480), 640, (480, 640)),  # 4:3 fits exactly
    ((1080, 1920), 640, (640, 384)),  # portrait
    ((100, 100), 640, (640, 640)),  # square (small images are scaled up, as square does)
    ((2000, 64), 640, (32, 640)),  # very wide: one stride
    ((1000, 750), 600, (480, 608)),  # imgsz rounded up to the stride: long side 608
])
def test_bucket_shape(size, imgsz, bucket):
    (batch,) = list(plan(manifest([size]), imgsz, 8))
    assert batch.input_hw == bucket


def test_resize_is_the_square_resize_and_centred_in_the_bucket():
    sizes = [(1920, 1080), (1080, 1920), (333, 517), (640, 480), (2000, 64), (4000, 3000)]
    square = letterbox(np.array([w for w, _ in sizes]), np.array([h for _, h in sizes]), 640, 640)
    for batch in plan(manifest(sizes), 640, 8):
        h, w = batch.input_hw
        lb = batch.letterbox
        for j, image_id in enumerate(batch.image_ids):
            assert (lb.new_w[j], lb.new_h[j]) == (square.new_w[image_id], square.new_h[image_id])
            assert h % 32 == 0 and w % 32 == 0 and max(h, w) == 640
            assert 0 <= lb.left[j] and lb.left[j] + lb.new_w[j] <= w
            assert 0 <= lb.top[j] and lb.top[j] + lb.new_h[j] <= h
            assert h - lb.new_h[j] < 32 or w - lb.new_w[j] < 32  # padded less than a stride
            assert abs((w - lb.new_w[j]) - 2 * lb.left[j]) <= 1  # centred


def random_manifest(n, seed=0, shards=3):
    rng = np.random.default_rng(seed)
    choices = [(640, 480), (1920, 1080), (1080, 1920), (4000, 3000), (800, 800), (300, 1200)]
    sizes = [choices[i] for i in rng.integers(0, len(choices), n)]
    return manifest(sizes, shards=rng.integers(0, shards, n).tolist(), ids=rng.permutation(n).tolist())


def test_batches_respect_budgets_shards_and_cover_every_image_once():
    table = random_manifest(500)
    p = plan(table, 640, 7, pixel_budget=6 * 640 * 480, decode_budget=40_000_000)
    seen = []
    for batch in p:
        ids = batch.image_ids.tolist()
        rows = table.filter(pa.compute.is_in(table.column("image_id"), pa.array(ids)))
        assert set(rows.column("shard").to_pylist()) == {batch.shard}  # never two shards
        assert 1 <= len(batch) <= 7
        h, w = batch.input_hw
        original = int((batch.width.astype(np.int64) * batch.height).sum())
        if len(batch) > 1:
            assert len(batch) * h * w <= 6 * 640 * 480
            assert original <= 40_000_000
        # paths, keys, sizes belong to the same images, in the same order
        by_id = {r["image_id"]: r for r in rows.to_pylist()}
        assert batch.paths == [by_id[i]["path"] for i in ids]
        assert batch.keys == [by_id[i]["key"] for i in ids]
        assert batch.width.tolist() == [by_id[i]["width"] for i in ids]
        seen += ids
    assert sorted(seen) == sorted(table.column("image_id").to_pylist())
    assert p.stats["batches_cut_by"]["decode_budget"] > 0 and p.stats["batches_cut_by"]["pixel_budget"] > 0


def test_input_shapes_cover_every_bucket():
    shapes = input_shapes(640, 32)
    assert len(shapes) == 39 and (640, 640) in shapes and (32, 640) in shapes and (640, 32) in shapes
    table = random_manifest(300, seed=4)
    assert {b.input_hw for b in plan(table, 640, 8)} <= set(shapes)
    assert input_shapes(640, 32, fixed_hw=(480, 640)) == [(480, 640)]


def test_decode_budget_splits_big_images():
    table = manifest([(4000, 3000)] * 5)
    sizes = [len(b) for b in plan(table, 640, 32, decode_budget=25_000_000)]
    assert sizes == [2, 2, 1]  # 12 MP each: two fit in 25 MP
    assert [len(b) for b in plan(table, 640, 32, decode_budget=1)] == [1] * 5  # one image always goes


def test_plan_is_deterministic_whatever_the_row_order():
    table = random_manifest(300, seed=1)
    shuffled = table.take(pa.array(np.random.default_rng(9).permutation(len(table))))
    a = [(b.shard, b.input_hw, b.image_ids.tolist()) for b in plan(table, 640, 5, pixel_budget=3_000_000)]
    b = [(b.shard, b.input_hw, b.image_ids.tolist()) for b in plan(shuffled, 640, 5, pixel_budget=3_000_000)]
    assert a == b
    shards = [s for s, _, _ in a]
    assert shards == sorted(shards)  # shard after shard: a part never waits for another shard


def test_fixed_shape_model_falls_back_to_one_square_shape():
    table = random_manifest(50)
    p = plan(table, 640, 8, fixed_hw=(640, 640))
    assert {b.input_hw for b in p} == {(640, 640)}
    assert p.stats["rectangular"] is False and p.stats["computed_vs_square"] == 1.0
    assert [b.image_ids.tolist() for b in plan_batches(table, (640, 640), 8)] == [b.image_ids.tolist() for b in p]


def test_padding_figures():
    p = plan(manifest([(1920, 1080)] * 10), 640, 32)
    s = p.stats
    assert s["images_per_bucket"] == {"384x640": 10}
    assert s["computed_pixels"] == 10 * 384 * 640 and s["square_computed_pixels"] == 10 * 640 * 640
    assert s["padding_waste"] == pytest.approx(1 - 360 / 384, abs=1e-6)
    assert s["square_padding_waste"] == pytest.approx(1 - 360 / 640, abs=1e-6)
    assert s["computed_vs_square"] == pytest.approx(0.6)
    assert plan(manifest([]), 640, 8).stats["images"] == 0  # an empty shard plans to nothing


def fixed_shape_copy(model_path, out_path, hw=(640, 640)):
    m = onnx.load(str(model_path))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = hw
    onnx.save(m, str(out_path))
    return out_path


SPECS = [("wide.jpg", 1920, 1080, "jpeg", 1), ("four3.jpg", 800, 600, "jpeg", 6),
         ("portrait.png", 600, 1000, "png", 1), ("thin.jpg", 1200, 160, "jpeg", 8),
         ("square.jpg", 500, 500, "jpeg", 3), ("small.png", 200, 90, "png", 1),
         ("wide2.jpg", 1280, 720, "jpeg", 3)]


def test_buckets_give_the_same_boxes_as_square_letterboxing(tmp_path, analytic_model, cli):
    make_images(tmp_path / "src", SPECS, seed=5)
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    square_model = fixed_shape_copy(analytic_model, tmp_path / "square.onnx")
    for name, model in (("buckets", analytic_model), ("square", square_model)):
        r = cli("run", tmp_path / "ds", "--model", model, "--out", tmp_path / name, "--max-batch", "3", "-q")
        assert r.exit_code == 0, r.output
    plans = {name: json.loads((tmp_path / name / "run.json").read_text())["plan"] for name in ("buckets", "square")}
    assert plans["buckets"]["rectangular"] and len(plans["buckets"]["images_per_bucket"]) >= 4
    assert plans["square"]["images_per_bucket"] == {"640x640": len(SPECS)}
    assert plans["buckets"]["computed_pixels"] < 0.7 * plans["square"]["computed_pixels"]

    def boxes(name):
        rows = read_detections(tmp_path / name).to_pylist()
        return {(r["path"], r["class_id"]): np.array([r["x1"], r["y1"], r["x2"], r["y2"]]) for r in rows}

    buckets, square = boxes("buckets"), boxes("square")
    assert buckets.keys() == square.keys() and len(buckets) >= len(SPECS)
    for key in buckets:
        assert np.abs(buckets[key] - square[key]).max() <= 0.5, key
