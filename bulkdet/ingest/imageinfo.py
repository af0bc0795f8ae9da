"""Format, size and EXIF orientation from an image's header, without decoding pixels."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

# Pillow's own bomb guard would raise before we can give a clean `too_large` status;
# bulkdet applies its own limit (--max-pixels) from the header instead.
Image.MAX_IMAGE_PIXELS = None

# Pillow 'format' -> our lowercase name. DALI's decoder reads all of these except GIF,
# which the decoder's fallback handles.
SUPPORTED_FORMATS = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "BMP": "bmp", "TIFF": "tiff",
    "WEBP": "webp", "GIF": "gif", "PPM": "pnm", "JPEG2000": "jpeg2000",
}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (~89.5 Mpx)
EXIF_ORIENTATION = 0x0112


class ImageError(Exception):
    """An input that is not a usable image; `status` is the images-table status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # upright, i.e. after applying the EXIF orientation
    height: int
    orientation: int  # EXIF 1..8; 1 when absent


def sniff(source: bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read an encoded image's header: `source` is its bytes, or a binary file of which only
    the header is read. Raises ImageError with a status on bad input; OSError when a read fails.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageError("unsupported", "empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as im:
                fmt = im.format
                width, height = im.size
                _check(fmt, width, height, max_pixels)  # before anything that may decode pixels
                orientation = _orientation(im)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("unsupported", "not a recognised image format") from None
    except OSError as exc:
        if exc.errno is not None:  # the file's read failed (e.g. EIO): not the image's fault
            raise
        raise ImageError("unsupported", f"unreadable image header: {exc}") from None
    except Exception as exc:
        raise ImageError("unsupported", f"unreadable image header: {exc}") from None
    if orientation not in range(1, 9):
        orientation = 1
    if orientation >= 5:  # 5..8 transpose the image: stored width is upright height
        width, height = height, width
    return ImageInfo(SUPPORTED_FORMATS[fmt], width, height, orientation)


def _check(fmt: str | None, width: int, height: int, max_pixels: int) -> None:
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError("unsupported", f"image format {fmt} is not supported")
    if width <= 0 or height <= 0:
        raise ImageError("unsupported", f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            "too_large", f"{width}x{height} = {width * height} pixels exceeds --max-pixels {max_pixels}"
        )


def _orientation(im: Image.Image) -> int:
    """EXIF orientation, 1 when absent or unreadable; never decodes pixels.

    Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixel
    data (a decompression bomb would be allocated here): a PNG's EXIF is read only when the
    chunk came before the pixels.
    """
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not a broken image
        return 1
