"""`bulkdet crops`: the crops hold exactly the detected pixels of the upright image."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from bulkdet.synthetic import CLASS_COLORS
from bulkdet.results.crops import crop_regions
from bulkdet.run.decode import CropDecoder, Decoder
from bulkdet.run.plan import Batch, letterbox
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


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth random colour: JPEG keeps detail, so a misplaced cut shows."""
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(rgb: np.ndarray, fmt: str, orientation: int = 1, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"exif": exif.tobytes()} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def _run_decode(data: bytes) -> np.ndarray:
    """The run's own decoder (DALI, CPU) with a letterbox that keeps the upright size: its pixels."""
    from bulkdet.ingest.imageinfo import sniff

    info = sniff(data)
    w, h = np.array([info.width], np.int32), np.array([info.height], np.int32)
    batch = Batch(0, 0, np.arange(1), [""], [b""], w, h, (info.height, info.width), letterbox(w, h, info.height, info.width))
    out = Decoder("cpu", max_batch=1, num_threads=1).decode(batch, [data])
    assert out.errors == {} and out.fallback == []
    return np.rint(np.asarray(out.tensor)[0] * 255).astype(np.uint8).transpose(1, 2, 0)


def _regions(w: int, h: int, rng) -> list[tuple[int, int, int, int]]:
    out = [(0, 0, w, h), (w - 1, h - 1, w, h), (3, 5, 4, 6)]  # all, the last pixel, one pixel
    for _ in range(5):
        x1, y1 = rng.integers(0, w - 1), rng.integers(0, h - 1)
        out.append((int(x1), int(y1), int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))))
    return out


def test_crop_decoder_cuts_the_pixels_the_run_decodes():
    """DALI's cut (CPU) equals the same region of the run's decoded image, exactly: EXIF
    orientations (regions in upright pixels), 4:2:0 JPEG, odd sizes, PNG; several crops an image,
    more images than a DALI batch."""
    rgb = _textured(157, 101, seed=1)
    files = [_encode(rgb, "JPEG", o, quality=q) for o in (1, 3, 6, 8) for q in (75, 95)] + [_encode(rgb, "PNG")]
    rng = np.random.default_rng(0)
    wholes = [_run_decode(data) for data in files]
    assert wholes[0].shape[:2] == (101, 157) and wholes[4].shape[:2] == (157, 101)  # orientation 6: turned
    regions = [np.array(_regions(full.shape[1], full.shape[0], rng)) for full in wholes]
    regions[1] = regions[1][3:]  # a window that is not the whole image
    pixels, errors = CropDecoder("cpu", max_batch=4, num_threads=1).cut(files, regions)
    assert errors == {}
    for crops, image_regions, full in zip(pixels, regions, wholes):
        assert len(crops) == len(image_regions)
        for crop, (x1, y1, x2, y2) in zip(crops, image_regions):
            assert crop.dtype == np.uint8
            np.testing.assert_array_equal(crop, full[y1:y2, x1:x2])


def test_crop_decoder_isolates_a_broken_image():
    """A truncated JPEG, garbage and a GIF (which DALI does not read: Pillow does) in one batch:
    the broken images are errors, every other crop is still cut exactly."""
    rgb = _textured(120, 90, seed=2)
    good = _encode(rgb, "JPEG", 6, quality=90)
    truncated = good[: len(good) // 2]
    garbage = b"\xff\xd8\xff\xe0 not really a jpeg"
    gif = _encode(rgb, "GIF")
    inside, upright = np.array([(10, 20, 50, 70), (0, 0, 3, 4)]), np.array([(0, 0, 90, 120)])
    encoded = [good, truncated, garbage, gif, gif, good]
    regions = [inside, inside, inside, inside, upright, upright]
    pixels, errors = CropDecoder("cpu", max_batch=8, num_threads=1).cut(encoded, regions)
    assert set(errors) == {1, 2, 4}  # 4: the upright region is outside the unrotated GIF
    assert "outside the 120x90 image" in errors[4]
    assert all(errors[i].startswith("dali: ") and "pillow: " in errors[i] for i in errors)
    full = _run_decode(good)
    np.testing.assert_array_equal(pixels[0][0], full[20:70, 10:50])
    np.testing.assert_array_equal(pixels[0][1], full[0:4, 0:3])
    np.testing.assert_array_equal(pixels[5][0], full)
    gif_full = np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"))
    np.testing.assert_array_equal(pixels[3][0], gif_full[20:70, 10:50])


def test_a_broken_image_costs_only_its_own_crops(analytic_model, cli, tmp_path, caplog):
    """The run's images packed again with one of them broken (half its bytes; given with
    --dataset): DALI and Pillow both reject it, so its crops are missing (exit 3, the file
    named); every other crop of the same batches is written."""
    import shutil

    from bulkdet.ingest.pack import pack
    from bulkdet.run.runner import RunConfig, run
    from bulkdet.synthetic import make_demo_images

    make_demo_images(tmp_path / "images", n=8, truth_path=tmp_path / "truth.json")
    pack(tmp_path / "images", tmp_path / "dataset", quiet=True)
    run(RunConfig(tmp_path / "dataset", analytic_model, tmp_path / "run", quiet=True))
    dets = read_detections(tmp_path / "run").to_pylist()
    victim = next(d["path"] for d in dets if d["path"].endswith(".jpg"))
    shutil.copytree(tmp_path / "images", tmp_path / "images2")
    source = tmp_path / "images2" / victim
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    pack(tmp_path / "images2", tmp_path / "dataset2", quiet=True)
    r = cli("crops", tmp_path / "run", "--out", tmp_path / "crops", "--device", "cpu", "--dataset", tmp_path / "dataset2")
    assert r.exit_code == 3 and "1 image(s) could not be read" in r.output, r.output
    assert f"{victim}: cannot decode: dali: " in caplog.text and "pillow: " in caplog.text
    written = {p.relative_to(tmp_path / "crops").as_posix() for p in (tmp_path / "crops").rglob("*.jpg")}
    index = pq.read_table(tmp_path / "crops" / "crops.parquet").to_pylist()
    assert written == {c["crop_path"] for c in index if c["path"] != victim}
    assert len(written) == len([d for d in dets if d["path"] != victim]) > 0


@pytest.mark.gpu
def test_gpu_cuts_what_the_cpu_cuts(demo_run, cli, tmp_path):
    """On the GPU (mixed decode, the cut there): the same crops; PNG pixels exactly, JPEG within
    what two JPEG decoders (nvJPEG, libjpeg-turbo) differ by."""
    rgb = _textured(157, 101, seed=3)
    files = [_encode(rgb, "JPEG", 6, quality=90), _encode(rgb, "PNG")]
    regions = [np.array([(5, 7, 60, 90), (0, 0, 101, 157)]), np.array([(5, 7, 60, 90), (0, 0, 157, 101)])]
    cpu, cpu_errors = CropDecoder("cpu", max_batch=2, num_threads=1).cut(files, regions)
    gpu, gpu_errors = CropDecoder("gpu", max_batch=2, num_threads=1).cut(files, regions)
    assert cpu_errors == gpu_errors == {}
    for a, b in zip(cpu[0], gpu[0]):
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 2
    for a, b in zip(cpu[1], gpu[1]):
        np.testing.assert_array_equal(a, b)
    r = cli("crops", demo_run["run"], "--out", tmp_path / "crops", "--device", "gpu", "-q")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "crops").rglob("*.jpg"))) == len(read_detections(demo_run["run"]))


def test_device_gpu_without_one_is_an_error(demo_run, cli, tmp_path):
    from conftest import gpu_status

    if gpu_status().gpus:
        pytest.skip("this machine has a GPU")
    r = cli("crops", demo_run["run"], "--out", tmp_path / "crops", "--device", "gpu")
    assert r.exit_code == 1 and "error: --device gpu: " in r.output
    assert not (tmp_path / "crops").exists()
