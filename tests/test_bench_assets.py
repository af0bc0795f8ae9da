"""Benchmark assets: the synthetic JPEG sets and the random-weight YOLOv8n ONNX."""

from __future__ import annotations

import ast
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bulkdet.model.info import model_metadata

# benchmarks/ is not an installed package; make it importable under plain `pytest`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import dataset  # noqa: E402


# ------------------------------------------------------------------ dataset

def test_size_mix_follows_real_world_proportions():
    sizes = dataset.size_mix(1000, seed=0)
    counts = Counter(sizes)
    assert len(sizes) == 1000
    assert counts[dataset.HUGE] == 30
    assert sum(counts[s] for s in dataset.PORTRAIT) == 80
    landscape = [s for s in sizes if s in dataset.LANDSCAPE]
    assert len(landscape) == 890
    assert set(landscape) == set(dataset.LANDSCAPE)
    assert all(w > h for w, h in landscape)
    assert all(w < h for w, h in dataset.PORTRAIT)
    assert sizes != sorted(sizes)  # shuffled, so any prefix is a mix too
    assert dataset.size_mix(1000, seed=0) == sizes
    assert dataset.size_mix(1000, seed=1) != sizes


def test_jpeg_mix_is_deterministic_and_decodes_to_planned_sizes(tmp_path):
    n = 12
    a = dataset.make_jpeg_mix(tmp_path / "a", n, seed=3)
    b = dataset.make_jpeg_mix(tmp_path / "b", n, seed=3, workers=1)
    assert [p.name for p in a] == [p.name for p in b]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]

    for path, size in zip(a, dataset.size_mix(n, seed=3)):
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.size == size
            assert im.mode == "RGB"
            arr = np.asarray(im)
        # Photo-like: neither flat nor pure noise.
        assert 10 < arr.std() < 90
        kb_per_mpix = path.stat().st_size / 1024 / (size[0] * size[1] / 1e6)
        assert 40 < kb_per_mpix < 200  # ~100-400 KB at 1920x1080

    other = dataset.make_jpeg_mix(tmp_path / "c", n, seed=4)
    assert [p.read_bytes() for p in other] != [p.read_bytes() for p in a]


def test_jpeg_mix_reuses_matching_cache_and_rebuilds_otherwise(tmp_path):
    first = dataset.make_jpeg_mix(tmp_path, 3, seed=0)
    mtimes = [p.stat().st_mtime_ns for p in first]
    again = dataset.make_jpeg_mix(tmp_path, 3, seed=0)
    assert again == first
    assert [p.stat().st_mtime_ns for p in again] == mtimes
    assert json.loads((tmp_path / dataset.MARKER).read_text())["n"] == 3

    first[1].unlink()  # an incomplete set is regenerated
    assert all(p.is_file() for p in dataset.make_jpeg_mix(tmp_path, 3, seed=0))

    reseeded = dataset.make_jpeg_mix(tmp_path, 2, seed=1)
    assert json.loads((tmp_path / dataset.MARKER).read_text())["seed"] == 1
    assert sorted(tmp_path.glob("*.jpg")) == reseeded  # no stale third file
    assert reseeded[0].read_bytes() != dataset.make_jpeg_mix(tmp_path / "s0", 2, seed=0)[0].read_bytes()


def test_small_images_are_deterministic_tiny_jpegs(tmp_path):
    a = dataset.make_small_images(tmp_path / "a", 50, size=(64, 48), seed=0)
    b = dataset.make_small_images(tmp_path / "b", 50, size=(64, 48), seed=0)
    assert len(a) == 50
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert len({p.read_bytes() for p in a}) == 50  # all different images
    for p in a[:5]:
        with Image.open(p) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (64, 48), "RGB")
    c = dataset.make_small_images(tmp_path / "c", 5, size=(32, 20), seed=0)
    with Image.open(c[0]) as im:
        assert im.size == (32, 20)


# -------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def yolo():
    pytest.importorskip("torch")  # dev/bench extra, not installed in CI
    from benchmarks import yolov8n

    return yolov8n


@pytest.fixture(scope="module")
def model_path(yolo, tmp_path_factory):
    return yolo.export_onnx(tmp_path_factory.mktemp("model") / "m.onnx", seed=0)


def _run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["output0"], {"images": x})[0]


@pytest.mark.slow
@pytest.mark.parametrize("b,h,w", [(1, 640, 640), (2, 384, 640), (1, 256, 192)])
def test_onnx_output_is_ultralytics_layout(model_path, b, h, w):
    x = np.random.default_rng(0).random((b, 3, h, w), dtype=np.float32)
    y = _run(model_path, x)
    n = h // 8 * w // 8 + h // 16 * w // 16 + h // 32 * w // 32
    assert y.shape == (b, 84, n)
    assert np.isfinite(y).all()
    scores = y[:, 4:]
    assert scores.min() >= 0 and scores.max() <= 1
    assert (y[:, 2:4] > 0).all()  # widths and heights
    # Box centres sit near their anchors, inside the padded-out image.
    assert -w < y[:, 0].min() and y[:, 0].max() < 2 * w
    assert -h < y[:, 1].min() and y[:, 1].max() < 2 * h


@pytest.mark.slow
def test_onnx_metadata_like_ultralytics(model_path):
    import onnx

    m = onnx.load(str(model_path))
    meta = model_metadata(m)
    names = ast.literal_eval(meta["names"])
    assert len(names) == 80
    assert names[0] == "person" and names[79] == "toothbrush"
    assert sorted(names) == list(range(80))
    assert meta["stride"] == "32"
    assert ast.literal_eval(meta["imgsz"]) == [640, 640]
    assert meta["task"] == "detect"
    assert "random" in meta["description"].lower()
    assert [i.name for i in m.graph.input] == ["images"]
    assert [o.name for o in m.graph.output] == ["output0"]
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)


@pytest.fixture(scope="module")
def model0(yolo):
    return yolo.build_model(seed=0)


@pytest.mark.slow
def test_model_is_realistic_size_and_gives_few_candidates(yolo, model0, model_path):
    assert 3.10e6 < yolo.count_params(model0) < 3.20e6
    assert 8.0e9 < yolo.count_flops(model0, 640, 640) < 9.5e9
    # Letterboxed photo-like images: tens of anchors over 0.25, not thousands.
    x = yolo.letterboxed_images(3, seed=7).numpy()
    counts = yolo.count_candidates(_run(model_path, x))
    assert all(c < 300 for c in counts), counts
    assert sum(counts) > 0, counts


@pytest.mark.slow
def test_export_is_deterministic_per_seed(yolo, model0, model_path, tmp_path):
    again = yolo.export_onnx(tmp_path / "again.onnx", seed=0)
    assert again.read_bytes() == model_path.read_bytes()
    w0 = model0.detect.cv3[0][-1].weight
    w1 = yolo.build_model(seed=1).detect.cv3[0][-1].weight
    assert w0.shape == w1.shape and not w0.equal(w1)


@pytest.mark.slow
def test_ensure_model_exports_once(yolo, tmp_path, monkeypatch):
    calls = []

    def fake_export(path, seed=0):
        calls.append(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setattr(yolo, "export_onnx", fake_export)
    path = yolo.ensure_model(tmp_path / "cache")
    assert yolo.MODEL_VERSION in path.name and path.is_file()
    assert yolo.ensure_model(tmp_path / "cache") == path
    assert calls == [0]
