"""--tile: planning, merging and whole runs with the exact analytic detector on large images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bulkdet.run.plan import plan
from bulkdet.run.tiles import TileSettings, expand, merge, starts, windows
from bulkdet.store.parts import read_detections, read_images
from bulkdet.synthetic import Rect, compare_with_truth, write_image
from conftest import ROOT
from test_resume import KILL_RUN

TILE = ("--tile", 640)  # overlap 0.2: tiles start every 512 px; tile 0 ends at 640, tile 1 spans 512..1152
SIDE = 4  # px: a 6 px square shrinks to about one input pixel at 640 and is mostly missed there


def test_tiles_cover_the_image_with_edge_tiles_shifted_inside():
    assert starts(640, 640, 0.2) == [0]  # no larger than a tile: one window, not tiled
    assert starts(1500, 640, 0.2) == [0, 512, 860]  # the last tile shifted inside, never padded
    win = windows(1500, 700, 640, 0.2)
    assert win.tolist()[:3] == [[0, 0, 640, 640], [512, 0, 1152, 640], [860, 0, 1500, 640]]
    assert (win[:, 2] - win[:, 0] == 640).all() and (win[:, 3] - win[:, 1] == 640).all()
    assert win[:, 2].max() == 1500 and win[:, 3].max() == 700 and win.min() == 0
    rows = pa.table({"image_id": [0, 1], "shard": [0, 0], "width": [1500, 300], "height": [700, 200],
                     "path": ["a", "b"], "key": [b"a", b"b"]})
    items = expand(rows, TileSettings(640))
    assert items.column("image_id").to_pylist() == [0] * 7 + [1]  # 6 tiles + the full image; b untiled
    assert items.column("tile").to_pylist() == [True] * 6 + [False, False]
    assert items.column("items").to_pylist() == [7] * 7 + [1]
    assert items.column("width").to_pylist()[6:] == [1500, 300]  # full passes: the whole image
    assert len(expand(rows, TileSettings(640, full=False))) == 7


def test_decode_budget_counts_the_window_decoded_per_image():
    rows = pa.table({"image_id": [0], "shard": [0], "width": [2000], "height": [640], "path": ["a"], "key": [b"a"]})
    items = expand(rows, TileSettings(640, overlap=0.0, full=False))  # 4 tiles in a row (the last shifted)
    # Two adjacent tiles decode one 1280x640 window: a budget of that takes two tiles a batch.
    p = plan(items, 640, 32, decode_budget=1280 * 640)
    assert p.batch_sizes().tolist() == [2, 2]
    region = p.batch(0).tiles.regions(p.batch(0).image_ids, p.batch(0).width, p.batch(0).height)
    assert region == [(0, [0, 1], (0, 0, 1280, 640))]


def _completions(p) -> tuple[list[int], int]:
    """Walking the plan in run order: the batch at which each image got its last item, and the
    most images pending (some items run, not all) after any batch."""
    seen: dict[int, int] = {}
    done, most = [], 0
    for k, batch in enumerate(p):
        for image_id, items in zip(batch.image_ids.tolist(), batch.tiles.items.tolist()):
            seen[image_id] = seen.get(image_id, 0) + 1
            if seen[image_id] == items:
                done.append(k)
                del seen[image_id]
        most = max(most, len(seen))
    assert not seen
    return done, most


def test_images_complete_steadily_with_the_full_pass():
    """--tile-full puts an image's items in two buckets (tiles, full pass): the batches of the
    buckets run merged by first image, so the first images complete after a few batches and
    pending images stay within a batch a bucket, while the batches stay full."""
    n = 40  # per shard: landscape images, a few portrait ones, a few not tiled
    sizes = [(700, 1500) if i % 7 == 3 else (300, 200) if i % 9 == 5 else (1500, 700) for i in range(n)]
    rows = pa.table({"image_id": list(range(2 * n)), "shard": [0] * n + [1] * n,
                     "width": [w for w, _ in sizes] * 2, "height": [h for _, h in sizes] * 2,
                     "path": [f"{i}.jpg" for i in range(2 * n)], "key": [i.to_bytes(2, "big") for i in range(2 * n)]})
    items = expand(rows, TileSettings(640))
    budget = 2 * 640 * 640  # two tiles a batch, four 320x640 full passes
    p = plan(items, 640, 8, pixel_budget=budget)
    cols = ("image_id", "tile_x", "tile_y", "width", "height")
    assert sorted(zip(*(p.table.column(c).to_pylist() for c in cols))) == \
        sorted(zip(*(items.column(c).to_pylist() for c in cols)))  # every item once
    buckets: dict[tuple, int] = {}
    for shard, h, w in zip(p.shard.tolist(), *zip(*[b.input_hw for b in p for _ in range(len(b))])):
        buckets[shard, h, w] = buckets.get((shard, h, w), 0) + 1
    full_batches = sum(-(-count // min(8, budget // (h * w))) for (_, h, w), count in buckets.items())
    assert len(p) == full_batches  # as many batches as bucket after bucket: all full but each bucket's last

    shard = p.shard[p.starts[:-1]]
    assert shard.tolist() == sorted(shard.tolist())  # still shard after shard
    done, most = _completions(p)
    per_bucket = {}
    for b in p:
        per_bucket[b.input_hw] = max(per_bucket.get(b.input_hw, 0), len(np.unique(b.image_ids)))
    assert most <= sum(per_bucket.values()) < n // 3  # not every image of the shard waiting for its tiles
    shard_batches = int((shard == 0).sum())
    assert done[0] <= 4 < shard_batches // 10  # the first image: its full pass's batch and its three of tiles
    assert sum(k < shard_batches // 2 for k in done) >= 0.4 * n  # half the shard's batches: ~half its images


def test_merge_seam_corner_and_full_pass():
    s = TileSettings(640)
    whole = [630, 630, 650, 650]
    # A box at a tile corner: the tile that holds it whole and three fragments, equal scores,
    # fragments first. Matching the growing union ends as one box, the whole one.
    boxes = np.array([[630, 630, 640, 640], [640, 630, 650, 640], [630, 640, 640, 650], whole], np.float32)
    b, sc, c = merge(boxes, np.ones(4, np.float32), np.zeros(4, np.int16), np.ones(4, bool), s, 100)
    assert b.tolist() == [whole] and c.tolist() == [0]
    # The full pass's coarse box matches but does not grow the tile box; the score is the best.
    boxes = np.array([[100, 100, 120, 118], [97, 98, 123, 121]], np.float32)
    b, sc, _ = merge(boxes, np.array([0.6, 0.9], np.float32), np.zeros(2, np.int16), np.array([True, False]), s, 100)
    assert b.tolist() == [[100, 100, 120, 118]] and sc.tolist() == pytest.approx([0.9])
    # Another class never merges; NMS keeps the best box as it is.
    b, _, c = merge(boxes, np.array([0.6, 0.9], np.float32), np.array([0, 1], np.int16), np.ones(2, bool), s, 100)
    assert len(b) == 2
    nms = TileSettings(640, merge="nms", match="iou")
    b, sc, _ = merge(boxes, np.array([0.6, 0.9], np.float32), np.zeros(2, np.int16), np.ones(2, bool), nms, 100)
    assert b.tolist() == [[97, 98, 123, 121]] and sc.tolist() == pytest.approx([0.9])


def _square(cls: int, x: int, y: int) -> Rect:
    return Rect(cls, x, y, x + SIDE, y + SIDE)


# (name, upright width, height, format, EXIF orientation, rects): per image one small square
# inside a tile, one cut by the seam at x = 640 (whole in the second tile), one at the corner
# (640, 640) where four tiles meet. One class per square: the analytic detector boxes all
# pixels of a colour in its input, so a colour occurs once an image.
SPECS = [
    ("a.jpg", 5000, 3000, "jpeg", 1, [_square(0, 2230, 1400), _square(1, 637, 300), _square(2, 637, 637)]),
    ("b.png", 4000, 3000, "png", 6, [_square(1, 3000, 2500), _square(2, 636, 1700), _square(0, 1149, 1149)]),
    ("c.jpg", 3600, 2400, "jpeg", 8, [_square(2, 1800, 200), _square(0, 1150, 900), _square(1, 636, 1150)]),
    ("d.jpg", 4200, 2800, "jpeg", 3, [_square(0, 3000, 2000), _square(1, 1148, 500), _square(2, 1660, 1660)]),
    ("small.jpg", 500, 400, "jpeg", 1, [Rect(1, 40, 30, 300, 200)]),  # no larger than a tile: not tiled
]


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory, analytic_model):
    from bulkdet.ingest.pack import pack

    root = tmp_path_factory.mktemp("tiles")
    (root / "src").mkdir()
    truth = []
    for name, w, h, fmt, orientation, rects in SPECS:
        write_image(root / "src" / name, w, h, rects, fmt=fmt, orientation=orientation, seed=len(truth))
        truth.append({"path": name, "width": w, "height": h, "rects": [r.as_list() for r in rects]})
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds", truth


def _found(truth: list[dict], detections: list[dict], within: float = 3.0) -> int:
    """Truth rectangles with a detection of their class whose corners are all within `within` px."""
    return sum(any(d["path"] == t["path"] and d["class_id"] == r[0] and
                   max(abs(a - b) for a, b in zip((d["x1"], d["y1"], d["x2"], d["y2"]), r[1:])) <= within
                   for d in detections) for t in truth for r in t["rects"])


def _detections(run_dir) -> list[dict]:
    return read_detections(run_dir).to_pylist()


# Budgets of eight 640x640 tiles a batch: tiles of two images share the batch at each image's end.
BATCH = ("--pixel-budget", 8 * 640 * 640, "--max-batch", 8)


@pytest.fixture(scope="module")
def tiled_run(big_dataset, analytic_model, tmp_path_factory):
    from typer.testing import CliRunner

    from bulkdet.cli import app

    out = tmp_path_factory.mktemp("tiled") / "run"
    r = CliRunner().invoke(app, ["run", str(big_dataset[0]), "--model", str(analytic_model), "--out", str(out),
                                 *map(str, TILE + BATCH), "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_tiles_find_small_objects_the_plain_run_misses(big_dataset, tiled_run, analytic_model, cli, tmp_path):
    dataset, truth = big_dataset
    images = read_images(tiled_run).to_pylist()
    assert sorted(r["path"] for r in images) == sorted(t["path"] for t in truth)  # one row per image
    assert {(r["width"], r["height"]) for r in images} == {(t["width"], t["height"]) for t in truth}
    # Every square found, once (the seam and corner ones too), within 3 px (the truth's
    # tolerance at a 640 px image, 2 px here, is tighter): the full pass did not grow them.
    assert compare_with_truth(truth, _detections(tiled_run), imgsz=max(t["width"] for t in truth)) == []

    plain = tmp_path / "plain"
    assert cli("run", dataset, "--model", analytic_model, "--out", plain, "-q").exit_code == 0
    squares = sum(len(t["rects"]) for t in truth[:-1])
    assert _found(truth[:-1], _detections(tiled_run)) == squares
    assert _found(truth[:-1], _detections(plain)) < squares // 2  # most of the 12 squares missed


@pytest.mark.slow
def test_tiles_of_several_images_share_batches_and_the_report_counts_them(tiled_run, cli):
    m = pq.read_table(tiled_run / "metrics.parquet").to_pylist()
    assert any(r["images"] > 1 and r["tiles"] > 1 for r in m)  # tiles of two images in one batch
    assert sum(r["images_written"] for r in m) == len(SPECS)
    expected_tiles = sum(len(windows(w, h, 640, 0.2)) for _, w, h, *_ in SPECS if max(w, h) > 640)
    assert sum(r["tiles"] for r in m) == expected_tiles
    assert sum(r["batch_size"] for r in m) == expected_tiles + len(SPECS)  # + one full pass each
    r = cli("report", tiled_run)
    assert r.exit_code == 0 and "tiles/s" in r.output


def test_the_cpu_fallback_counts_images_not_tiles(analytic_model, cli, tmp_path):
    """A GIF (DALI's parser does not read GIF: the Pillow fallback) whose tiles span four batches,
    each decoding its own window (a decode budget under the image's pixels, no full pass): one
    image decoded by the fallback, counted once in the summary and in run.json; its square found."""
    from PIL import Image

    from bulkdet.ingest.pack import pack

    (tmp_path / "src").mkdir()
    picture = Image.new("RGB", (1500, 700), (90, 90, 90))
    picture.paste((255, 0, 0), (700, 300, 720, 320))
    picture.save(tmp_path / "src" / "wide.gif")
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    budget = 2 * 640 * 640  # two tiles a batch
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", *TILE, "--no-tile-full",
            "--pixel-budget", budget, "--decode-budget", budget, "-q")
    assert r.exit_code == 0, r.output
    assert "1 image(s) decoded by the CPU fallback" in r.output
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["totals"]["fallback_decoded"] == 1
    # 6 tiles in 4 batches: the decode budget keeps a row's last tile from the next row's first
    assert len(pq.read_table(tmp_path / "run" / "metrics.parquet")) == 4
    assert [(d["class_id"], d["x1"], d["y1"], d["x2"], d["y2"]) for d in _detections(tmp_path / "run")] == \
        [(0, 700, 300, 720, 320)]


def test_an_image_whose_tiles_span_batches_is_read_once(analytic_model, cli, tmp_path, monkeypatch):
    """The read stage keeps the last image's bytes for the next batch, where its tiles continue:
    a 100-megapixel JPEG is not copied out of its shard again for every batch of two tiles."""
    from bulkdet.ingest.pack import pack
    from bulkdet.store.readers import ShardBytes

    (tmp_path / "src").mkdir()
    write_image(tmp_path / "src" / "a.jpg", 1900, 1300, [Rect(0, 700, 300, 720, 320)])
    write_image(tmp_path / "src" / "b.jpg", 1500, 700, [Rect(1, 100, 100, 120, 120)])
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    asked: list[bytes] = []
    real = ShardBytes.read
    monkeypatch.setattr(ShardBytes, "read", lambda self, shard, ids, keys: (asked.extend(keys),
                                                                             real(self, shard, ids, keys))[1])
    budget = 2 * 640 * 640  # two tiles a batch: each image's tiles span several batches
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", *TILE, "--no-tile-full",
            "--pixel-budget", budget, "-q")
    assert r.exit_code == 0, r.output
    assert len(pq.read_table(tmp_path / "run" / "metrics.parquet")) > 4
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 2  # each image read once
    assert {(d["class_id"], d["x1"], d["y1"]) for d in _detections(tmp_path / "run")} == {(0, 700, 300), (1, 100, 100)}


def test_tile_options_are_checked_when_parsed(analytic_model, cli, tmp_path):
    (tmp_path / "ds").mkdir()
    for bad in (("--tile", 16), ("--tile", -1), ("--tile", 640, "--tile-overlap", 0.95),
                ("--tile", 640, "--tile-merge", "wbf"), ("--tile", 640, "--tile-match", "giou"),
                ("--tile", 640, "--tile-match-threshold", 1.5)):
        r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "never", *bad, "-q")
        assert r.exit_code == 2 and "--tile" in r.output, (bad, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_tile_settings_are_part_of_the_run_identity(big_dataset, tiled_run, analytic_model, cli):
    dataset, _ = big_dataset
    # The same folder with other tile settings (or none) is refused, its results untouched.
    before = read_detections(tiled_run).to_pylist()
    for other in (("--tile", 800), ("--tile", 640, "--tile-match", "iou"), ()):
        r = cli("run", dataset, "--model", analytic_model, "--out", tiled_run, *map(str, other + BATCH), "-q")
        assert r.exit_code == 2 and "tiles" in r.output, (other, r.output)
    assert read_detections(tiled_run).to_pylist() == before


def test_check_precision_merges_an_images_items_and_leaves_out_failed_images(analytic_model, tmp_path):
    """The check on tile items compares images, not items: a square cut by a seam (seen whole by
    one tile, as a fragment by the other, and by the full pass) is one box of one image; an image
    that fails to decode is left out."""
    from bulkdet.engines import create_engine
    from bulkdet.run.decode import Decoder
    from bulkdet.run.precision_check import Detector, check_precision

    good = write_image(tmp_path / "a.png", 1500, 700, [Rect(0, 630, 300, 650, 320)], fmt="png").read_bytes()
    data = {b"a": good, b"b": b"\xff\xd8\xff\xe0 not really a jpeg"}
    rows = pa.table({"image_id": [0, 1], "shard": [0, 0], "width": [1500, 1500], "height": [700, 700],
                     "path": ["a.png", "b.jpg"], "key": [b"a", b"b"]})
    settings = TileSettings(640)
    batches = plan(expand(rows, settings), 640, 4, pixel_budget=2 * 640 * 640)
    engine = create_engine("onnxruntime", analytic_model)
    detect = [Detector(engine, Decoder("cpu", 4, 1), lambda outputs: "yolov8", 0.25, 0.45, 300) for _ in range(2)]
    report = check_precision(batches, lambda b: [data[key] for key in b.keys], *detect, "fp16", settings)
    engine.close()
    d = report.as_dict()
    assert (d["images"], d["reference_boxes"], d["matched"], d["drifting"]) == (1, 1, 1, 0)


@pytest.mark.slow
def test_check_precision_compares_the_tiles_the_run_runs(big_dataset, analytic_model, cli, tmp_path):
    """--check-precision with --tile: both models run the run's items (tiles and full passes),
    merged per image as the run merges them, so the FP32 reference finds each small square the
    run finds (whole images at 640 would miss most of them), box for box."""
    from bulkdet.store.manifest import read_manifest

    dataset, _ = big_dataset
    out = tmp_path / "run"
    r = cli("run", dataset, "--model", analytic_model, "--out", out, *TILE, *BATCH, "--nms-in-model",
            "--check-precision", 2, "--cache-dir", tmp_path / "cache", "-q")
    assert r.exit_code == 0, r.output
    assert "precision check, fp32+nms vs fp32 on 2 images" in r.output
    check = json.loads((out / "run.json").read_text())["precision_check"]
    first = read_manifest(dataset).sort_by([("shard", "ascending"), ("image_id", "ascending")])
    checked = set(first.column("image_id").to_pylist()[:2])
    boxes = sum(d["image_id"] in checked for d in _detections(out))
    assert boxes == 6  # three squares an image, all found by the run
    assert check["images"] == 2 and check["reference_boxes"] == check["boxes"] == check["matched"] == boxes
    assert check["drifting"] == 0 and check["min_iou"] == 1.0


@pytest.mark.slow
def test_kill_9_mid_image_then_resume_gives_identical_output(big_dataset, tiled_run, analytic_model, tmp_path):
    """Killed after the first committed image, while later images have only some tiles done:
    the parts hold complete images only, and the resumed run equals the uninterrupted one."""
    dataset, _ = big_dataset
    out = tmp_path / "run"
    args = ["run", dataset, "--model", analytic_model, "--out", out, *TILE, *BATCH, "--commit-every", 1, "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for kill_at, committed in (("journal:1", 1), ("images:2", 3)):  # the second resumes the first
        proc = subprocess.run([sys.executable, "-c", KILL_RUN, *map(str, args)], env={**env, "KILL_AT": kill_at},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        done = read_images(out).to_pylist()
        assert len(done) == committed  # complete images only: one row each, all its boxes
        for row in done:
            assert row["n_det"] == sum(d["image_id"] == row["image_id"] for d in _detections(out))
    proc = subprocess.run([sys.executable, "-m", "bulkdet", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def canonical(run_dir):
        dets = sorted(_detections(run_dir), key=lambda d: (d["image_id"], d["class_id"]))
        return read_images(run_dir).sort_by("image_id").to_pylist(), dets

    assert canonical(out) == canonical(tiled_run)
