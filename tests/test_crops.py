"""`bulkdet crops`: the crops hold exactly the detected pixels of the upright image."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from bulkdet.synthetic import CLASS_COLORS
from bulkdet.results.crops import crop_regions
from bulkdet.store.parts import read_detections


def upright(images_dir, path) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(images_dir / path)).convert("RGB")).astype(int)


def test_crops_hold_the_detected_pixels(demo_run, cli, tmp_path):
    out = tmp_path / "crops"
    r = cli("crops", demo_run["run"], "--out", out, "-q")
    assert r.exit_code == 0, r.output
    index = pq.read_table(out / "crops.parquet").to_pylist()
    dets = read_detections(demo_run["run"]).to_pylist()
    assert len(index) == len(dets) == len({c["crop_path"] for c in index})
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.jpg")} == {c["crop_path"] for c in index}
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"red", "green", "blue"}
    for c in index:
        assert c["crop_path"].startswith(c["class_name"] + "/")
        region = (c["crop_x1"], c["crop_y1"], c["crop_x2"], c["crop_y2"])
        # No padding: the region is the box, rounded to whole pixels.
        assert np.abs(np.array(region) - [c["x1"], c["y1"], c["x2"], c["y2"]]).max() <= 0.5
        crop = np.asarray(Image.open(out / c["crop_path"]).convert("RGB")).astype(int)
        want = upright(demo_run["images"], c["path"])[region[1]:region[3], region[0]:region[2]]
        assert crop.shape == want.shape
        assert np.abs(crop - want).mean() < 3  # JPEG quality 95, 4:4:4: the same pixels
        # The analytic detector boxes a solid rectangle: the crop is that colour.
        assert np.abs(np.median(crop.reshape(-1, 3), 0) - CLASS_COLORS[("red", "green", "blue").index(c["class_name"])]).max() <= 3


def test_rerun_skips_and_other_settings_are_refused(demo_run, cli, tmp_path):
    out = tmp_path / "crops"
    assert cli("crops", demo_run["run"], "--out", out, "--classes", "green", "-q").exit_code == 0
    files = sorted(out.rglob("*.jpg"))
    assert files and all(f.parent.name == "green" for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    files[0].unlink()  # as if a kill had come before this one was written
    r = cli("crops", demo_run["run"], "--out", out, "--classes", "green", "-q")
    assert r.exit_code == 0 and f"1 written, {len(files) - 1} already there" in r.output
    assert [f.stat().st_mtime_ns for f in files[1:]] == mtimes[1:] and files[0].exists()
    r = cli("crops", demo_run["run"], "--out", out, "--pad", "4")
    assert r.exit_code == 2 and "other settings" in r.output
    assert json.loads((out / "crops.json").read_text())["pad"] == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    assert cli("crops", demo_run["run"], "--out", foreign).exit_code == 2
    assert [p.name for p in foreign.iterdir()] == ["a.txt"]


def test_pad_square_min_size(demo_run, cli, tmp_path):
    out = tmp_path / "crops"
    r = cli("crops", demo_run["run"], "--out", out, "--pad", "0.25", "--square", "--min-size", "40", "-q")
    assert r.exit_code == 0, r.output
    index = pq.read_table(out / "crops.parquet").to_pylist()
    dets = read_detections(demo_run["run"]).to_pylist()
    big = [d for d in dets if min(d["x2"] - d["x1"], d["y2"] - d["y1"]) >= 40]
    assert 0 < len(index) == len(big) < len(dets)
    for c in index:
        img = upright(demo_run["images"], c["path"])
        h, w = img.shape[:2]
        side = max(c["x2"] - c["x1"], c["y2"] - c["y1"]) * 1.5
        region = (c["crop_x1"], c["crop_y1"], c["crop_x2"], c["crop_y2"])
        if region[0] > 0 and region[1] > 0 and region[2] < w and region[3] < h:  # not cut by the border
            assert abs((region[2] - region[0]) - side) <= 1 and abs((region[3] - region[1]) - side) <= 1
        crop = Image.open(out / c["crop_path"])
        assert crop.size == (region[2] - region[0], region[3] - region[1])


def test_crop_regions_geometry():
    boxes = np.array([[10.4, 20.6, 30.4, 30.6], [0.2, 0.2, 5.0, 5.0], [90.0, 40.0, 100.0, 50.0]], np.float32)
    w, h = np.array([100, 100, 100]), np.array([50, 50, 50])
    np.testing.assert_array_equal(crop_regions(boxes, w, h, 0, False), [[10, 21, 30, 31], [0, 0, 5, 5], [90, 40, 100, 50]])
    np.testing.assert_array_equal(crop_regions(boxes, w, h, 2, False), [[8, 19, 32, 33], [0, 0, 7, 7], [88, 38, 100, 50]])
    np.testing.assert_array_equal(crop_regions(boxes[:1], w[:1], h[:1], 0.5, False), [[0, 16, 40, 36]])
    np.testing.assert_array_equal(crop_regions(boxes[:1], w[:1], h[:1], 0, True), [[10, 16, 30, 36]])


def test_another_dataset_is_caught(demo_run, cli, tmp_path):
    from conftest import make_images

    from bulkdet.ingest.pack import pack

    make_images(tmp_path / "other", [(f"o_{i:02d}.png", 80, 60, "png", 1) for i in range(24)])
    pack(tmp_path / "other", tmp_path / "other_ds", quiet=True)
    r = cli("crops", demo_run["run"], "--out", tmp_path / "crops", "--dataset", tmp_path / "other_ds", "-q")
    assert r.exit_code == 3 and "could not be read" in r.output
    assert not list((tmp_path / "crops").rglob("*.jpg"))
