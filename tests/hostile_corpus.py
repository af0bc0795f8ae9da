"""A corpus of hostile inputs mixed with good images, and the behaviour expected of each.

`build_hostile_corpus(src)` writes it and returns {manifest path: expected status} plus the
truth of the images whose detections must be right. docs/reliability.md has the same table.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bulkdet.synthetic import draw_upright, random_rects


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunks(width: int, height: int, rows, bit_depth: int, color_type: int):
    """The bytes of a PNG, in pieces, from raw scanlines (no filter byte); compressed as it streams."""
    yield b"\x89PNG\r\n\x1a\n"
    yield _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    z = zlib.compressobj(9)
    pending = b""
    for row in rows:
        pending += z.compress(b"\x00" + row)
        if len(pending) > 1 << 20:
            yield _chunk(b"IDAT", pending)
            pending = b""
    yield _chunk(b"IDAT", pending + z.flush())
    yield _chunk(b"IEND", b"")


def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A side x side 1-bit gray PNG of zeros: ~50 KB on disk, `side`² pixels when decoded.

    Written row by row from one shared zero row: creating it takes no memory either.
    """
    zero_row = bytes((side + 7) // 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.writelines(png_chunks(side, side, (zero_row for _ in range(side)), bit_depth=1, color_type=0))
    return path


def png16_bytes(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of an 8-bit image (value * 257: the exact 16-bit equivalent)."""
    h, w, _ = rgb.shape
    wide = (rgb.astype(">u2") * 257).reshape(h, w * 3)
    return b"".join(png_chunks(w, h, (row.tobytes() for row in wide), bit_depth=16, color_type=2))


def ycck_jpeg_bytes(rgb: np.ndarray) -> bytes:
    """A 4-channel Adobe JPEG with transform 2 (YCCK), as Photoshop writes for CMYK images.

    Pillow can't write YCCK: we write the YCCK planes as a CMYK JPEG and set the Adobe
    transform flag. libjpeg turns YCCK back into inverted CMYK = (255 - R, 255 - G, 255 - B, K)
    for inks, so the planes are YCbCr of the inverted image with K = 255 (no black ink).
    """
    ycc = np.asarray(Image.fromarray(255 - rgb).convert("YCbCr"))
    k = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    buf = io.BytesIO()
    # Pillow stores CMYK inverted (the Adobe convention): pre-invert so the planes land as they are.
    Image.fromarray(255 - np.concatenate([ycc, k], axis=2), "CMYK").save(buf, format="JPEG", quality=95)
    data = bytearray(buf.getvalue())
    adobe = data.find(b"\xff\xee")  # the Adobe APP14 segment
    assert adobe > 0, "Pillow wrote no Adobe APP14 segment"
    length = int.from_bytes(data[adobe + 2:adobe + 4], "big")
    data[adobe + 2 + length - 1] = 2  # the transform flag ends the segment: 2 = YCCK
    return bytes(data)


def _encode(rgb: np.ndarray, kind: str) -> bytes:
    """The image in one of the formats the corpus covers."""
    im = Image.fromarray(rgb, "RGB")
    buf = io.BytesIO()
    if kind == "progressive":
        im.save(buf, format="JPEG", quality=95, subsampling=0, progressive=True)
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, format="JPEG", quality=95)
    elif kind == "ycck":
        return ycck_jpeg_bytes(rgb)
    elif kind == "gray":
        im.convert("L").save(buf, format="PNG")
    elif kind == "gray16":
        gray = np.asarray(im.convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray).save(buf, format="PNG")  # mode I;16
    elif kind == "palette":
        im.quantize(256, dither=Image.Dither.NONE).save(buf, format="PNG")
    elif kind == "rgba":
        im.convert("RGBA").save(buf, format="PNG")
    elif kind == "rgb16":
        return png16_bytes(rgb)
    elif kind == "webp":
        im.save(buf, format="WEBP", lossless=True)
    elif kind == "bmp":
        im.save(buf, format="BMP")
    elif kind == "tiff":
        im.save(buf, format="TIFF", compression="tiff_lzw")
    else:
        raise ValueError(kind)
    return buf.getvalue()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


# Formats that must decode (by DALI, or by the CPU fallback) to correct detections.
COLOR_FORMATS = {"progressive": "progressive.jpg", "cmyk": "cmyk.jpg", "ycck": "ycck.jpg",
                 "palette": "palette.png", "rgba": "rgba.png", "rgb16": "rgb16.png",
                 "webp": "lossless.webp", "bmp": "image.bmp", "tiff": "image.tiff"}
# Gray images decode fine but hold no colour: the analytic detector finds nothing.
GRAY_FORMATS = {"gray": "gray.png", "gray16": "gray16.png"}


def build_hostile_corpus(src: Path, seed: int = 0) -> tuple[dict[str, str], list[dict]]:
    """Write the corpus; returns ({manifest path: expected status}, truth for detections).

    Expected statuses are those of a default `pack` (symbolic links not followed) and the
    `run` after it. The caller may add entries that depend on the machine (permissions).
    """
    src = Path(src)
    rng = np.random.default_rng(seed)
    expected: dict[str, str] = {}
    truth: list[dict] = []

    def put(rel: str | bytes, data: bytes, status: str, w: int | None = None, h: int | None = None,
            rects=None) -> None:
        raw = os.fsencode(src) + b"/" + (rel if isinstance(rel, bytes) else rel.encode())
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as f:
            f.write(data)
        name = rel.decode("utf-8", "backslashreplace") if isinstance(rel, bytes) else rel
        expected[name] = status
        if rects is not None:
            truth.append({"path": name, "width": w, "height": h, "rects": [r.as_list() for r in rects]})

    def picture(w: int, h: int):
        rects = random_rects(w, h, 3, rng)
        return draw_upright(w, h, rects, seed=int(rng.integers(1 << 30))), rects

    # Good images, and the same bytes again under a second path (stored once, two rows).
    good_rgb, good_rects = picture(160, 120)
    good = _jpeg(good_rgb)
    put("good/a.jpg", good, "ok", 160, 120, good_rects)
    put("good/dup_of_a.jpg", good, "ok", 160, 120, good_rects)
    for i in range(3):
        rgb, rects = picture(96 + 32 * i, 128)
        put(f"good/b{i}.jpg", _jpeg(rgb), "ok", 96 + 32 * i, 128, rects)

    for kind, name in COLOR_FORMATS.items():
        rgb, rects = picture(128, 96)
        put(f"formats/{name}", _encode(rgb, kind), "ok", 128, 96, rects)
    for kind, name in GRAY_FORMATS.items():
        put(f"formats/{name}", _encode(picture(128, 96)[0], kind), "ok", 128, 96, [])
    # Animated GIF: DALI rejects GIF, the CPU fallback decodes the first frame.
    first, rects = picture(128, 96)
    frames = [Image.fromarray(a).quantize(256, dither=Image.Dither.NONE) for a in (first, picture(128, 96)[0])]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("formats/animated.gif", buf.getvalue(), "ok", 128, 96, rects)
    # 1x1 red: letterboxed to a full red input, i.e. one red box covering the pixel.
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(buf, format="PNG")
    put("formats/one_pixel.png", buf.getvalue(), "ok")

    # Names: unicode, spaces, quotes, bytes that are not UTF-8 (shown as \xNN in the manifest).
    for rel in ("names/ünïcødé 画像.jpg", "names/with  spaces .jpg", "names/quote's \"double\".jpg",
                b"names/latin1-\xe9t\xe9 \xff.jpg"):
        rgb, rects = picture(112, 112)
        put(rel, _jpeg(rgb), "ok", 112, 112, rects)
    # A folder named like an image is a folder: walked, no row of its own.
    rgb, rects = picture(100, 140)
    put("x.jpg/inside.jpg", _jpeg(rgb), "ok", 100, 140, rects)
    (src / "empty_folder.jpg").mkdir()

    # Broken files.
    put("bad/empty.jpg", b"", "unsupported")
    put("bad/text.jpg", b"this is a text file, not a JPEG\n" * 20, "unsupported")
    # Damaged data: found at pack (the file's structure), stored and run all the same.
    put("bad/truncated.jpg", good[: len(good) // 2], "decode_error")
    garbage = good[:1024] + np.random.default_rng(seed + 1).integers(0, 256, len(good) - 1024, np.uint8).tobytes()
    put("bad/garbage_after_1kb.jpg", garbage, "corrupt")  # libjpeg-turbo would conceal it: decodes, garbled
    write_bomb_png(src / "bad/bomb_20000x20000.png")
    expected["bad/bomb_20000x20000.png"] = "too_large"

    # Links: to a file, read as the file; to a folder, no row (walked only with --follow-symlinks,
    # and a loop is not walked again); and a FIFO (not a regular file; never opened).
    links = src / "links"
    links.mkdir()
    os.symlink("..", links / "loop")
    os.symlink("self", links / "self")
    os.symlink("missing.jpg", links / "dangling.jpg")
    os.symlink("../good/a.jpg", links / "to_good.jpg")
    os.symlink("/proc/self/mem", links / "io_error.jpg")  # a file whose read fails with EIO
    expected.update(LINKS)
    os.mkfifo(src / "fifo.jpg")
    expected["fifo.jpg"] = "unsupported"
    return expected, truth


# What each link becomes, with or without --follow-symlinks (links/loop, to a folder: no row).
LINKS = {"links/self": "read_error", "links/dangling.jpg": "read_error", "links/to_good.jpg": "ok",
         "links/io_error.jpg": "read_error"}
