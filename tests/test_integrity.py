"""Damaged image data found at pack from the file's structure: status `corrupt`, stored, run."""

from __future__ import annotations

import io
import numpy as np
import pytest
from PIL import Image

from bulkdet.synthetic import draw_upright, random_rects
from bulkdet.ingest.integrity import structure_problem
from bulkdet.ingest.pack import pack
from bulkdet.store.manifest import processed, read_manifest
from bulkdet.store.parts import read_detections, read_images
from bulkdet.store.shards import ShardReader


def _picture(w=160, h=120, seed=0) -> np.ndarray:
    return draw_upright(w, h, random_rects(w, h, 3, np.random.default_rng(seed)), seed=seed)


def _encode(rgb, fmt, **kwargs) -> bytes:
    return _encode_image(Image.fromarray(rgb), fmt, **kwargs)


def _encode_image(im, fmt, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _exif_with_thumbnail() -> bytes:
    """A JPEG whose APP1 holds a JPEG thumbnail (its own SOI..EOI): skipped as a segment."""
    exif = Image.Exif()
    exif[0x0112] = 1
    thumb = _encode(_picture(32, 24), "JPEG")
    data = bytearray(_encode(_picture(), "JPEG", exif=exif.tobytes()))
    app1 = data.find(b"\xff\xe1")
    length = int.from_bytes(data[app1 + 2:app1 + 4], "big")
    data[app1 + 2 + length:app1 + 2 + length] = b"\xff\xe2" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    return bytes(data)


def _gif(frames=2) -> bytes:
    pal = [Image.fromarray(_picture(seed=s)).quantize(64) for s in range(frames)]
    buf = io.BytesIO()
    pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:], duration=50)
    return buf.getvalue()


GOOD = {
    "baseline": ("jpeg", lambda: _encode(_picture(), "JPEG", quality=90)),
    "progressive": ("jpeg", lambda: _encode(_picture(), "JPEG", progressive=True)),
    "restart markers": ("jpeg", lambda: _encode(_picture(), "JPEG", restart_marker_blocks=1)),
    "cmyk": ("jpeg", lambda: _encode_image(Image.fromarray(_picture()).convert("CMYK"), "JPEG")),
    "thumbnail in a segment": ("jpeg", _exif_with_thumbnail),
    "data after the end marker": ("jpeg", lambda: _encode(_picture(), "JPEG") + b"\xff\x12camera trailer"),
    "png": ("png", lambda: _encode(_picture(), "PNG")),
    "webp lossy": ("webp", lambda: _encode(_picture(), "WEBP")),
    "webp lossless": ("webp", lambda: _encode(_picture(), "WEBP", lossless=True)),
    "animated gif": ("gif", _gif),
}


@pytest.mark.parametrize("name", GOOD)
def test_sound_images_pass(name):
    fmt, make = GOOD[name]
    assert structure_problem(make(), fmt) is None


def _with_garbage(data: bytes, start: int = 1024, seed: int = 1) -> bytes:
    return data[:start] + np.random.default_rng(seed).integers(0, 256, len(data) - start, np.uint8).tobytes()


def _png_with_bad_crc() -> bytes:
    data = bytearray(_encode(_picture(), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 20] ^= 0x01  # one bit of the compressed pixels
    return bytes(data)


JPEG = _encode(_picture(), "JPEG", quality=95)
DAMAGED = {
    "jpeg: random bytes after 1 KB": ("jpeg", _with_garbage(JPEG), "corrupt"),
    "jpeg: truncated in the scan": ("jpeg", JPEG[: len(JPEG) * 2 // 3], "truncated"),
    "jpeg: a bad marker in the scan": ("jpeg", JPEG[:-200] + b"\xff\x42" + JPEG[-198:], "invalid marker 0xFF42"),
    "jpeg: progressive, truncated": ("jpeg", _encode(_picture(), "JPEG", progressive=True)[:-600], "truncated"),
    "png: CRC error": ("png", _png_with_bad_crc(), "CRC error in the 'IDAT' chunk"),
    "png: truncated": ("png", _encode(_picture(), "PNG")[:-30], "truncated"),
    "webp: truncated": ("webp", _encode(_picture(), "WEBP")[:-50], "truncated"),
    "gif: truncated": ("gif", _gif()[:-100], "truncated"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_images_are_found(name):
    fmt, data, reason = DAMAGED[name]
    problem = structure_problem(data, fmt)
    assert problem is not None and reason in problem, problem


def test_random_damage_after_the_header_is_always_found():
    """Garbage replacing a JPEG's scan data from any point on, 200 draws: none passes."""
    rng = np.random.default_rng(0)
    for i in range(200):
        start = int(rng.integers(JPEG.find(b"\xff\xda") + 20, len(JPEG) - 10))
        assert structure_problem(_with_garbage(JPEG, start, seed=i), "jpeg") is not None, (i, start)


def test_corrupt_images_are_packed_as_corrupt_and_stored(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jpg").write_bytes(JPEG)
    (src / "garbage.jpg").write_bytes(_with_garbage(JPEG))
    (src / "bad_crc.png").write_bytes(_png_with_bad_crc())
    summary = pack(src, tmp_path / "ds", quiet=True)
    rows = {r["path"]: r for r in read_manifest(tmp_path / "ds").to_pylist()}
    assert {p: r["status"] for p, r in rows.items()} == {"good.jpg": "ok", "garbage.jpg": "corrupt",
                                                         "bad_crc.png": "corrupt"}
    assert rows["good.jpg"]["error"] is None and rows["bad_crc.png"]["error"].startswith("CRC error")
    assert summary.by_status == {"ok": 1, "corrupt": 2}
    reader = ShardReader(tmp_path / "ds" / "shards")
    for path, row in rows.items():  # the bytes of every one are stored, unchanged
        assert reader.get_many(row["shard"], [row["key"]]) == [(src / path).read_bytes()]
    reader.close()
    assert len(processed(read_manifest(tmp_path / "ds"))) == 3


def test_a_corrupt_image_is_run_its_detections_written_and_its_status_kept(tmp_path, analytic_model, cli):
    src = tmp_path / "src"
    src.mkdir()
    rgb = _picture(256, 192, seed=3)
    data = _encode(rgb, "JPEG", quality=95)
    (src / "damaged_at_the_end.jpg").write_bytes(data[:-400] + b"\xff\x42" + data[-398:])
    assert cli("pack", src, "--out", tmp_path / "ds", "-q").exit_code == 0
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "--imgsz", 256, "-q")
    assert r.exit_code == 3, r.output  # corrupt counts as a failed input (listed), detections kept
    (row,) = read_images(tmp_path / "run").to_pylist()
    assert row["status"] == "corrupt" and "invalid marker 0xFF42" in row["error"]
    assert row["n_det"] > 0 and len(read_detections(tmp_path / "run")) == row["n_det"]
