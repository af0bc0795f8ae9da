import io

import pytest
from PIL import Image

from bulkdet.ingest.imageinfo import ImageError, sniff


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,name", [("JPEG", "jpeg"), ("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tiff"),
                                      ("WEBP", "webp"), ("GIF", "gif")])
def test_format_and_size(fmt, name):
    info = sniff(encode(Image.new("RGB", (37, 21)), fmt))
    assert (info.format, info.width, info.height, info.orientation) == (name, 37, 21, 1)


@pytest.mark.parametrize("orientation,upright", [(1, (40, 30)), (3, (40, 30)), (6, (30, 40)), (8, (30, 40)),
                                                 (5, (30, 40)), (2, (40, 30))])
def test_exif_orientation_gives_upright_size(orientation, upright):
    exif = Image.Exif()
    exif[0x0112] = orientation
    info = sniff(encode(Image.new("RGB", (40, 30)), "JPEG", exif=exif))
    assert info.orientation == orientation
    assert (info.width, info.height) == upright


def test_not_an_image_and_empty():
    with pytest.raises(ImageError) as e:
        sniff(b"hello, this is text")
    assert e.value.status == "unsupported"
    with pytest.raises(ImageError) as e:
        sniff(b"")
    assert e.value.status == "unsupported" and "empty" in str(e.value)


def test_too_large_read_from_header_only():
    data = encode(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageError) as e:
        sniff(data, max_pixels=9_999)
    assert e.value.status == "too_large" and "10000" in str(e.value)
    assert sniff(data, max_pixels=10_000).width == 100
