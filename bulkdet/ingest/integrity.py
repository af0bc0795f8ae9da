"""Damaged image data found without decoding: the file's structure, checked on its bytes.

A decoder may conceal damage (libjpeg-turbo decodes a JPEG with garbage in its scan data, the
image grey or garbled below it, and only warns on stderr), so pack checks each file's
structure: JPEG markers and entropy-coded data, PNG chunk CRCs, and the end of every format
(a truncated file). What fails gets status `corrupt` with the reason; it is still stored and
run (see docs/reliability.md).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# Markers that may follow a scan: tables, restart interval, next scan, DNL, comments, APPn, EOI.
_AFTER_SCAN = {0xC4, 0xCC, 0xDB, 0xDD, 0xDA, 0xDC, 0xFE, 0xD9, *range(0xE0, 0xF0)}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
_EOI, _SOS = 0xD9, 0xDA


def structure_problem(data: bytes, fmt: str) -> str | None:
    """Why `data` (an image of format `fmt`, as sniffed) is damaged; None when its structure holds."""
    check = _CHECKS.get(fmt)
    return check(data) if check else None


def _scan_ends(data: bytes) -> np.ndarray:
    """Offsets of every 0xFF that starts a marker, sorted (one numpy pass over the file).

    In JPEG entropy-coded data a 0xFF byte is followed only by 0x00 (a stuffed byte), RST0-7
    or more 0xFF fill; any other byte makes it the marker that ends the scan.
    """
    arr = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    nxt = arr[ff + 1]
    return ff[(nxt != 0) & ((nxt < 0xD0) | (nxt > 0xD7)) & (nxt != 0xFF)]


def jpeg_problem(data: bytes) -> str | None:
    n = len(data)
    pos, scans, after_scan = 2, 0, False  # after the SOI marker
    ends = None  # _scan_ends, computed at the first scan
    while True:
        if pos >= n:
            return f"truncated: the file ends at byte {n} before the end-of-image marker"
        if data[pos] != 0xFF:
            return f"corrupt: byte 0x{data[pos]:02X} at {pos} where a marker should start"
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return f"truncated: the file ends at byte {n} before the end-of-image marker"
        code, at = data[pos], pos - 1
        pos += 1
        if after_scan and code not in _AFTER_SCAN:
            return f"corrupt scan data: invalid marker 0xFF{code:02X} at byte {at}"
        if code == _EOI:
            return None if scans else f"no image data: end-of-image marker at byte {at} before any scan"
        if code in _STANDALONE:
            continue
        if code < 0xC0 or code == 0xD8:
            return f"corrupt: invalid marker 0xFF{code:02X} at byte {at}"
        if pos + 2 > n:
            return f"truncated inside the segment of marker 0xFF{code:02X} at byte {at}"
        end = pos + int.from_bytes(data[pos:pos + 2], "big")
        if end > n:
            return f"truncated inside the segment of marker 0xFF{code:02X} at byte {at}"
        if end < pos + 2:
            return f"corrupt: segment of marker 0xFF{code:02X} at byte {at} has an invalid length"
        pos, after_scan = end, False
        if code == _SOS:
            scans += 1
            ends = _scan_ends(data) if ends is None else ends
            i = int(np.searchsorted(ends, pos))
            if i == len(ends):
                return "truncated: the scan data runs to the end of the file (no end-of-image marker)"
            pos, after_scan = int(ends[i]), True


def png_problem(data: bytes) -> str | None:
    view, n, pos = memoryview(data), len(data), 8  # after the signature
    while True:
        if pos + 12 > n:
            return f"truncated: the file ends at byte {n} before the IEND chunk"
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        name = kind.decode("latin-1")
        if end > n:
            return f"truncated inside the {name!r} chunk at byte {pos}"
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"CRC error in the {name!r} chunk at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end


def webp_problem(data: bytes) -> str | None:
    n = len(data)
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > n:
        return f"truncated: {n} bytes, the RIFF header says {riff_end}"
    pos = 12  # after "RIFF", size, "WEBP"
    while pos + 8 <= riff_end:
        kind = data[pos:pos + 4].decode("latin-1")
        end = pos + 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
        if end > riff_end:
            return f"corrupt: the {kind!r} chunk at byte {pos} runs past the end of the RIFF data"
        pos = end + (end & 1)  # chunks are padded to an even size
    return None


def gif_problem(data: bytes) -> str | None:
    n = len(data)
    pos = 13  # header and logical screen descriptor
    if n > 10 and data[10] & 0x80:  # global colour table
        pos += 3 << ((data[10] & 7) + 1)
    frames = 0
    while True:
        if pos >= n:
            return f"truncated: the file ends at byte {n} before the GIF trailer"
        block = data[pos]
        if block == 0x3B:
            return None if frames else "no image data: the GIF trailer comes before any frame"
        if block == 0x21:  # extension: label, then data sub-blocks
            pos += 2
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                return f"truncated inside the image descriptor at byte {pos}"
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1
            frames += 1
        else:
            return f"corrupt: invalid block 0x{block:02X} at byte {pos}"
        while True:  # data sub-blocks, ended by a zero-length one
            if pos >= n:
                return f"truncated: the file ends at byte {n} inside a data block"
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


_CHECKS = {"jpeg": jpeg_problem, "png": png_problem, "webp": webp_problem, "gif": gif_problem}
