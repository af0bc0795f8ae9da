"""`run --classes` keeps only those classes (ids or names, filtered before NMS and the top-k);
class names in every metadata form; --names with fewer names than the model's classes is refused."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bulkdet.model.info import UnknownClass, class_ids, parse_names
from bulkdet.run.plan import plan
from bulkdet.run.postprocess import postprocess
from bulkdet.synthetic import CLASS_NAMES, compare_with_truth
from conftest import make_images


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from bulkdet.ingest.pack import pack

    root = tmp_path_factory.mktemp("classes")
    specs = [(f"{i}.jpg", w, h, "jpeg", 1) for i, (w, h) in enumerate([(640, 480), (300, 900), (800, 800), (500, 333)])]
    truth = make_images(root / "src", specs, seed=11)
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds", truth


def _only(truth, kept):
    return [{**t, "rects": [r for r in t["rects"] if r[0] in kept]} for t in truth]


@pytest.mark.parametrize("option,kept", [("0,2", {0, 2}), (f"{CLASS_NAMES[1]}", {1}),
                                         (f"{CLASS_NAMES[2]},0", {0, 2})])
def test_classes_keeps_only_those(tmp_path, analytic_model, cli, packed, option, kept):
    dataset, truth = packed
    assert any(r[0] not in kept for t in truth for r in t["rects"])  # something to drop
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "-q", "--classes", option)
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "run" / "detections").to_pylist()
    assert {row["class_id"] for row in rows} <= kept and rows
    assert compare_with_truth(_only(truth, kept), rows) == []
    fingerprint = json.loads((tmp_path / "run" / "fingerprint.json").read_text())
    assert fingerprint["classes"] == sorted(kept)  # part of the run's identity
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "-q")  # other classes: refused
    assert r.exit_code == 2 and "error:" in r.output


@pytest.mark.parametrize("option,bad", [("3", "'3'"), ("person", "'person'"), ("0,zebra", "'zebra'")])
def test_an_unknown_class_is_one_line_naming_the_known_ones(tmp_path, analytic_model, cli, packed, option, bad):
    dataset, _ = packed
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "-q", "--classes", option)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "'--classes'" in lines[0], r.output
    assert f"unknown class {bad}" in lines[0] and all(f"{i}={n}" in lines[0] for i, n in enumerate(CLASS_NAMES))
    assert not (tmp_path / "run").exists()


def test_class_ids_resolves_names_and_ids():
    names = {0: "person", 1: "bicycle", 2: "car"}
    assert class_ids(["car,0"], names) == [0, 2] and class_ids(["person", "1"], names) == [0, 1]
    assert class_ids(None, names) is None and class_ids([""], names) is None
    assert class_ids(["7"], {}) == [7]  # a model without names: ids only
    with pytest.raises(UnknownClass, match="none named"):
        class_ids(["person"], {})


def test_the_filter_comes_before_the_top_k():
    """With --max-det 1, the best box of a kept class is kept although another class scores higher."""
    import pyarrow as pa

    rows = pa.table({"image_id": [0], "shard": pa.array([0], pa.int32()), "path": ["a"], "key": [b"k"],
                     "width": [640], "height": [640], "status": ["ok"], "error": [None]})
    batch = next(iter(plan(rows, 640, 1)))
    out = np.zeros((1, 7, 2), np.float32)  # yolov8 [B, 4+3, N]: two boxes far apart
    out[0, :4, 0] = [100, 100, 50, 50]
    out[0, :4, 1] = [400, 400, 50, 50]
    out[0, 4, 0] = 0.9  # class 0, best
    out[0, 6, 1] = 0.6  # class 2
    all_dets = postprocess([out], batch, "yolov8", 0.25, 0.45, 1)[0]
    assert all_dets.class_ids.tolist() == [0]
    kept = postprocess([out], batch, "yolov8", 0.25, 0.45, 1, classes=[2])[0]
    assert kept.class_ids.tolist() == [2] and kept.scores.tolist() == pytest.approx([0.6])


@pytest.mark.parametrize("text", [
    "{0: 'person', 1: 'car'}",  # Ultralytics' metadata
    '["person", "car"]', '{"0": "person", "1": "car"}', "person\ncar\n",
    "0: person\n1: car\n",  # YAML mapping
    "names:\n  0: person\n  1: car\npath: ../data\n",  # an Ultralytics data.yaml
    "names: [person, car]\nnc: 2\n",
    "mode: paddle\ndraw_threshold: 0.5\nlabel_list:\n- person\n- car\n",  # PaddleDetection's infer_cfg.yml
])
def test_names_in_every_form(text):
    assert parse_names(text) == {0: "person", 1: "car"}


def test_fewer_names_than_classes_says_so(tmp_path, analytic_model, cli, packed):
    dataset, _ = packed
    names = tmp_path / "names.txt"
    names.write_text("only-one\n")
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "-q", "--names", names)
    assert r.exit_code == 2
    assert "gives 1 class names, fewer than the model's 3 classes" in r.output and "'--names'" in r.output
