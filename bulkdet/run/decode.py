"""DALI letterbox pipeline: encoded bytes -> upright, resized, padded, normalised CHW tensor (in the
model's channel order, RGB or BGR, straight from the decoder); and the crop pipeline of `bulkdet
crops`: encoded bytes -> upright pixel regions (RGB).

One graph for both devices: `cpu` decodes on the host, `gpu` uses DALI's "mixed" decoder
(nvJPEG / hardware decoder) and keeps everything after it on the GPU.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from nvidia import nvimgcodec  # DALI's own image codec library (a dependency of DALI)
from nvidia.dali import fn, pipeline_def, types
from PIL import Image, ImageOps

import bulkdet.ingest.imageinfo  # noqa: F401 - sets Pillow's own pixel limit off: --max-pixels applies
from bulkdet.model.info import InputNorm
from bulkdet.run.plan import DEFAULT_DECODE_BUDGET, Batch

PAD_VALUE = 114
_DALI_DTYPES = {np.float32: types.FLOAT, np.float16: types.FLOAT16}


@dataclass
class DecodedBatch:
    batch: Batch
    tensor: object  # np.ndarray [B,3,H,W] on cpu; a DALI TensorGPU on gpu
    errors: dict[int, str] = field(default_factory=dict)  # index in batch -> decoder message
    fallback: list[int] = field(default_factory=list)  # indices decoded by the CPU fallback (Pillow)


@pipeline_def
def _letterbox_graph(decoder_device: str, out_dtype, norm: InputNorm, hw_decoder_load: float | None = None):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    # adjust_orientation (default on) applies EXIF orientation: output is upright.
    images = fn.decoders.image(encoded, device=decoder_device, output_type=_decoded_type(norm),
                               **_mixed_options(decoder_device, hw_decoder_load))
    return _letterbox(images, out_dtype, norm)


def _decoded_type(norm: InputNorm):
    """The decoders write the model's channel order themselves: BGR costs no pass of its own."""
    return types.BGR if norm.bgr else types.RGB


@pipeline_def
def _region_graph(decoder_device: str, output_type, hw_decoder_load: float | None = None):
    """Tiles, step 1: per image of a batch, the window bounding its tiles, decoded once (in the
    model's channel order, `output_type`). DALI decodes by region (ROI, in upright pixels): a
    JPEG's decoder skips what lies outside, so a 100-megapixel image costs its window's pixels in
    memory, not its own."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    start = fn.external_source(name="start", dtype=types.INT32, ndim=1)  # x0, y0
    shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)  # w, h
    return fn.decoders.image_slice(encoded, start, shape, device=decoder_device, output_type=output_type,
                                   normalized_anchor=False, normalized_shape=False, axis_names="WH",
                                   **_mixed_options(decoder_device, hw_decoder_load))


@pipeline_def
def _tile_graph(device: str, out_dtype, norm: InputNorm):
    """Tiles, step 2: each tile cut from its image's decoded window (already in the model's channel
    order), then letterboxed as an image."""
    # no_copy: a kept image is fed to every batch of its tiles; DALI reads it in place (the
    # decoder holds it until the run returns).
    regions = fn.external_source(name="regions", dtype=types.UINT8, ndim=3, layout="HWC", device=device,
                                 no_copy=True)
    start = fn.external_source(name="start", dtype=types.INT32, ndim=1)  # x0, y0 in the region
    shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)  # w, h
    return _letterbox(fn.slice(regions, start, shape, axis_names="WH"), out_dtype, norm)


def _letterbox(images, out_dtype, norm: InputNorm):
    """Resize to the planned size, then pad and normalise (inputs fed per sample: see `_feed_letterbox`)."""
    resize_hw = fn.external_source(name="resize_hw", dtype=types.FLOAT, ndim=1)
    crop_hw = fn.external_source(name="crop_hw", dtype=types.FLOAT, ndim=1)
    crop_pos_x = fn.external_source(name="crop_pos_x", dtype=types.FLOAT, ndim=0)
    crop_pos_y = fn.external_source(name="crop_pos_y", dtype=types.FLOAT, ndim=0)
    # Plain bilinear, as the reference YOLO predictors resize (cv2 INTER_LINEAR, no antialias):
    # the model sees what it sees there, and decode costs ~20 % less CPU.
    images = fn.resize(images, size=resize_hw, antialias=False, interp_type=types.INTERP_LINEAR)
    # One pass: a crop window larger than the image, placed so that the image lands at
    # (top, left), pads with gray while normalising to CHW (the model's input scale, mean and std;
    # fill is in output units: the gray normalised as a pixel is).
    mean, std = norm.on_bytes()
    return fn.crop_mirror_normalize(images, crop=crop_hw, crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y,
                                    out_of_bounds_policy="pad", fill_values=pad_values(norm).tolist(),
                                    dtype=out_dtype, output_layout="CHW", mean=mean, std=std)


def normalise(pixels: np.ndarray, norm: InputNorm) -> np.ndarray:
    """8-bit pixels [3, ...] in the model's channel order as the model input, on the host (what
    `_letterbox` does in DALI)."""
    mean, std = norm.on_bytes()
    shape = (3,) + (1,) * (pixels.ndim - 1)
    # Cast into a new array straight from the (often transposed) uint8 view, then in place:
    # ~5x faster than astype on the view or a ufunc with dtype= over it.
    out = np.empty(pixels.shape, np.float32)
    np.copyto(out, pixels, casting="unsafe")
    out -= np.reshape(mean, shape).astype(np.float32)
    out *= np.reshape(1 / np.asarray(std, np.float64), shape).astype(np.float32)
    return out


def pad_values(norm: InputNorm) -> np.ndarray:
    """The letterbox gray as the model sees it: one value per channel, normalised as any pixel."""
    return normalise(np.full(3, PAD_VALUE, np.uint8), norm)


@pipeline_def
def _crop_graph(decoder_device: str):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)  # (x, y)
    shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)  # (width, height)
    # The run's decoder with a region of interest: the same upright pixels (EXIF orientation
    # applied, the region in upright coordinates; equal to cutting the full decode, tested),
    # but a JPEG decodes only the rows and columns the region needs; on the GPU the region
    # is cut there and only it comes back.
    return fn.decoders.image_slice(encoded, anchor, shape, device=decoder_device, output_type=types.RGB,
                                   normalized_anchor=False, normalized_shape=False, axis_names="WH")


def _crop_pos(offset: int, padding: int) -> np.ndarray:
    """DALI places a crop window at crop_pos * (image - window); a window `padding` pixels
    larger than the image, starting `offset` pixels before it, is at offset / padding."""
    return np.array(offset / padding if padding else 0.0, np.float32)


def _mixed_options(decoder_device: str, hw_decoder_load: float | None) -> dict:
    """The share of JPEGs the GPU decoder sends to the hardware JPEG decoder (A100/H100 have
    one); DALI's default when None. The CPU decoder takes no such option."""
    if decoder_device != "mixed" or hw_decoder_load is None:
        return {}
    return {"hw_decoder_load": hw_decoder_load}


def _pipe_options(decoder) -> dict:
    """How every decoder's DALI pipeline runs: its batch, threads and device; synchronous, one
    batch at a time (the run's stages overlap the work, not DALI's prefetching)."""
    return dict(batch_size=decoder.max_batch, num_threads=decoder.num_threads,
                device_id=decoder.device_id if decoder.device == "gpu" else None,
                prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)


class Decoder:
    """Decodes whole batches; when DALI rejects a batch, isolates the bad images."""

    def __init__(self, device: str = "cpu", max_batch: int = 32, num_threads: int | None = None,
                 out_dtype=np.float32, device_id: int = 0, hw_decoder_load: float | None = None,
                 decode_budget: int = DEFAULT_DECODE_BUDGET, norm: InputNorm = InputNorm()):
        self.device = device
        self.norm = norm  # the model's input scale, mean, std and channel order
        self.decode_budget = decode_budget  # tiles: an image up to this many pixels is decoded whole, once
        self.hw_decoder_load = hw_decoder_load
        self.max_batch = max_batch
        self.num_threads = num_threads or max(1, os.cpu_count() or 1)
        self.out_dtype = out_dtype
        self.device_id = device_id
        self.pipe = self._build()
        self._tiles = TileDecoder(self)

    def _build(self):
        pipe = _letterbox_graph(
            decoder_device="mixed" if self.device == "gpu" else "cpu",
            out_dtype=_DALI_DTYPES[np.dtype(self.out_dtype).type], norm=self.norm,
            hw_decoder_load=self.hw_decoder_load, **_pipe_options(self))
        pipe.build()
        return pipe

    def _run(self, encoded: list[bytes], batch: Batch, idx: list[int]):
        self.pipe.feed_input("encoded", [np.frombuffer(encoded[i], np.uint8) for i in idx])
        _feed_letterbox(self.pipe, batch, idx)
        (out,) = self.pipe.run()
        return out.as_tensor()

    def decode(self, batch: Batch, encoded: list[bytes]) -> DecodedBatch:
        if batch.tiles is not None:
            return self._tiles.decode(batch, encoded)
        # What DALI's own parser rejects never reaches DALI: a parse failure inside a large
        # DALI batch can crash the process (seen with DALI 2.4), not just fail the batch.
        errors = {i: msg for i, data in enumerate(encoded) if (msg := _parse_error(data)) is not None}
        idx = [i for i in range(len(batch)) if i not in errors]
        error = None
        if not errors:
            try:
                return DecodedBatch(batch, self._to_output(self._run(encoded, batch, idx)))
            except RuntimeError as exc:
                self._rebuild()
                error = exc
        # Some image is bad: isolate it so that a bad image costs only its own row. This rare
        # path assembles the batch on the host.
        tensor = self.padding(batch)

        def decode_group(group: list[int]) -> None:
            tensor[group] = _to_host(self._run(encoded, batch, group))
        decode_isolating(decode_group, idx, errors, self._rebuild, None if errors else error)
        # What DALI rejects gets a second chance on the CPU decoder (e.g. GIF).
        fallback = []
        for i in sorted(errors):
            try:
                tensor[i] = pillow_letterbox(encoded[i], batch, i, self.out_dtype, self.norm)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
                errors[i] = f"dali: {errors[i]}; pillow: {_pillow_message(exc)}"[:500]
            else:
                fallback.append(i)
                del errors[i]
        return DecodedBatch(batch, tensor, errors, fallback)

    def _rebuild(self) -> None:
        self.pipe = self._build()  # a pipeline that raised is not reused

    def padding(self, batch: Batch) -> np.ndarray:
        """A host batch of letterbox gray only (rows a failed image leaves are this)."""
        h, w = batch.input_hw
        pad = pad_values(self.norm).astype(self.out_dtype)
        return np.broadcast_to(pad[None, :, None, None], (len(batch), 3, h, w)).copy()

    def _to_output(self, tensor):
        return np.array(tensor) if self.device == "cpu" else tensor


def _feed_letterbox(pipe, batch: Batch, idx: list[int]) -> None:
    lb = batch.letterbox
    h, w = batch.input_hw
    pipe.feed_input("resize_hw", [np.array([lb.new_h[i], lb.new_w[i]], np.float32) for i in idx])
    pipe.feed_input("crop_hw", [np.array([h, w], np.float32) for _ in idx])
    pipe.feed_input("crop_pos_x", [_crop_pos(lb.left[i], w - lb.new_w[i]) for i in idx])
    pipe.feed_input("crop_pos_y", [_crop_pos(lb.top[i], h - lb.new_h[i]) for i in idx])


class TileDecoder:
    """Batches of tile items (run/tiles.py): each image decoded once, its items cut from it and
    letterboxed.

    An image's items follow each other in run order but may span batches. On CPU an image of
    at most the decode budget's pixels is decoded whole and kept until its items are done (one
    image kept: at most the decode budget's pixels besides the batch's); a larger one, and every
    image on GPU (whose batches hold many tiles), is decoded per batch by region, the window
    bounding its items in the batch (DALI's ROI decoding: the rest of a JPEG is skipped).

    Fault isolation as for whole images: what DALI's parser rejects, or a region DALI fails to
    decode, goes to the Pillow fallback (whole image decoded once, its items cut from it); what
    Pillow fails too is an error of every item of that image.
    """

    def __init__(self, owner: Decoder):
        self.owner = owner
        self.regions_pipe = self.tiles_pipe = None
        self.kept: tuple[int, tuple, np.ndarray] | None = None  # (image id, window, pixels) of the last image

    def _build(self) -> None:
        o = self.owner
        common = _pipe_options(o)
        self.regions_pipe = _region_graph(decoder_device="mixed" if o.device == "gpu" else "cpu",
                                          output_type=_decoded_type(o.norm), hw_decoder_load=o.hw_decoder_load,
                                          **common)
        self.tiles_pipe = _tile_graph(device=o.device, out_dtype=_DALI_DTYPES[np.dtype(o.out_dtype).type],
                                      norm=o.norm, **common)
        self.regions_pipe.build()
        self.tiles_pipe.build()

    def _window(self, tiles: tuple, width: int, height: int) -> tuple:
        """What to decode of an image for the tiles of a batch (`tiles`: the box around them).
        CPU, kept for the next batches: the whole image, else a band across the image's width
        from the batch's first tile row, as tall as the decode budget allows (a JPEG's region
        decode still reads the data before the region: few tall bands cost far less than one
        a tile row), when its tiles' rows fit in the budget."""
        if self.owner.device != "cpu":
            return tiles
        budget = self.owner.decode_budget
        if width * height <= budget:
            return (0, 0, width, height)
        if width * (tiles[3] - tiles[1]) <= budget:
            return (0, tiles[1], width, min(height, tiles[1] + budget // width))
        return tiles

    def decode(self, batch: Batch, encoded: list[bytes]) -> DecodedBatch:
        if self.regions_pipe is None:
            self._build()
        t = batch.tiles
        errors: dict[int, str] = {}
        regions: dict[int, object] = {}  # first item -> its decoded window (HWC uint8)
        images, good = [], []
        for first, items, window in t.regions(batch.image_ids, batch.width, batch.height):
            image_id = int(batch.image_ids[first])
            if self.kept and self.kept[0] == image_id and _inside(window, self.kept[1]):
                images.append((first, items, self.kept[1]))
                regions[first] = self.kept[2]
                continue
            window = self._window(window, int(t.image_width[first]), int(t.image_height[first]))
            images.append((first, items, window))
            msg = _parse_error(encoded[first])
            if msg is None:
                good.append((first, items, window))
            else:
                errors[first] = msg
        self._decode_regions(encoded, good, regions, errors)
        fallback = []
        by_first = {first: (items, window) for first, items, window in images}
        for first in sorted(errors):  # what DALI rejects gets a second chance on the CPU decoder
            items, window = by_first[first]
            try:  # in the model's channel order, as DALI decodes the windows (the copy swaps them)
                pixels = pillow_pixels(encoded[first], self.owner.norm)
                regions[first] = np.ascontiguousarray(pixels[window[1]:window[3], window[0]:window[2]])
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
                errors[first] = f"dali: {errors[first]}; pillow: {_pillow_message(exc)}"[:500]
            else:
                fallback.append(first)
                del errors[first]
        if self.owner.device == "cpu" and images and images[-1][0] in regions:  # the image the next batch may continue
            first, _, window = images[-1]
            # Kept only within the budget: the full pass of a larger image decodes it whole, once.
            if (window[2] - window[0]) * (window[3] - window[1]) <= self.owner.decode_budget:
                self.kept = (int(batch.image_ids[first]), window, regions[first])
        item_errors = {i: errors[first] for first, items, _ in images if first in errors for i in items}
        idx = [i for i in range(len(batch)) if i not in item_errors]
        owner = self.owner
        if not idx:
            tensor = owner.padding(batch)
            return DecodedBatch(batch, tensor, item_errors, fallback)
        if fallback and owner.device == "gpu":  # one feed is all on the device or all on the host
            regions = {k: v if isinstance(v, np.ndarray) else _to_host(v) for k, v in regions.items()}
        image_of = {i: (first, window) for first, items, window in images for i in items}
        lb = batch.letterbox
        if owner.device == "cpu" and all(lb.new_w[i] == batch.width[i] and lb.new_h[i] == batch.height[i]
                                         for i in idx):
            # Every tile keeps its size (`--tile` = the input size): each is a view of its decoded
            # window (in the model's channel order already), placed and normalised in one numpy
            # pass, ~20x cheaper on a CPU core than DALI's slice + resize + normalise of it.
            tensor = owner.padding(batch)
            for i in idx:
                first, window = image_of[i]
                x, y = int(t.x[i]) - window[0], int(t.y[i]) - window[1]
                pixels = regions[first][y:y + int(batch.height[i]), x:x + int(batch.width[i])]
                tensor[i] = _letterbox_pixels(pixels, batch, i, owner.out_dtype, owner.norm)
            return DecodedBatch(batch, tensor, item_errors, fallback)
        p = self.tiles_pipe
        p.feed_input("regions", [regions[image_of[i][0]] for i in idx], layout="HWC")
        p.feed_input("start", [np.array([t.x[i] - image_of[i][1][0], t.y[i] - image_of[i][1][1]], np.int32)
                               for i in idx])
        p.feed_input("shape", [np.array([batch.width[i], batch.height[i]], np.int32) for i in idx])
        _feed_letterbox(p, batch, idx)
        (out,) = p.run()
        if not item_errors:
            return DecodedBatch(batch, owner._to_output(out.as_tensor()), {}, fallback)
        tensor = owner.padding(batch)
        tensor[idx] = _to_host(out.as_tensor())
        return DecodedBatch(batch, tensor, item_errors, fallback)

    def _decode_regions(self, encoded, images, regions: dict, errors: dict[int, str]) -> None:
        """Decode each image's window; on failure, one image at a time (the bad ones into `errors`)."""
        if not images:
            return
        p = self.regions_pipe
        try:
            p.feed_input("encoded", [np.frombuffer(encoded[first], np.uint8) for first, _, _ in images])
            p.feed_input("start", [np.array(win[:2], np.int32) for _, _, win in images])
            p.feed_input("shape", [np.array([win[2] - win[0], win[3] - win[1]], np.int32) for _, _, win in images])
            (out,) = p.run()
        except RuntimeError as exc:
            self._build()  # a pipeline that raised is not reused
            if len(images) == 1:
                errors[images[0][0]] = _dali_message(exc)
                return
            for one in images:
                self._decode_regions(encoded, [one], regions, errors)
            return
        for k, (first, _, _) in enumerate(images):
            # GPU: the window stays on the device; CPU: a host array (copied: DALI reuses its buffers).
            regions[first] = out[k] if self.owner.device == "gpu" else np.array(out[k])


def _inside(window, outer) -> bool:
    return outer[0] <= window[0] and outer[1] <= window[1] and window[2] <= outer[2] and window[3] <= outer[3]


class CropDecoder:
    """Cuts pixel regions out of encoded images, upright as the run's `Decoder` sees them.

    Each image is decoded once, in batches of images: only the window that holds all its
    regions (DALI's region-of-interest decode), from which its crops are views. What DALI
    rejects falls back to Pillow (`pillow_upright`); an image neither reads is an error for
    that image only.
    """

    def __init__(self, device: str = "cpu", max_batch: int = 16, num_threads: int | None = None,
                 device_id: int = 0):
        self.device = device
        self.max_batch = max_batch
        self.num_threads = num_threads or max(1, os.cpu_count() or 1)
        self.device_id = device_id
        self.pipe = self._build()

    def _build(self):
        pipe = _crop_graph(decoder_device="mixed" if self.device == "gpu" else "cpu", **_pipe_options(self))
        pipe.build()
        return pipe

    def _rebuild(self) -> None:
        self.pipe = self._build()  # a pipeline that raised is not reused

    def cut(self, encoded: list[bytes], regions: list[np.ndarray]) -> tuple[list[list[np.ndarray] | None], dict[int, str]]:
        """Image i is `encoded[i]`, cut at each row of `regions[i]` = (x1, y1, x2, y2), x2 and y2
        exclusive: a list of [h, w, 3] uint8 arrays; None for the images in the returned errors
        (index -> message)."""
        regions = [np.asarray(r, np.int64).reshape(-1, 4) for r in regions]
        window = np.array([[*r[:, :2].min(0), *r[:, 2:].max(0)] for r in regions], np.int64).reshape(-1, 4)
        crops: list[list[np.ndarray] | None] = [None] * len(encoded)
        errors = {i: msg for i, data in enumerate(encoded) if (msg := _parse_error(data)) is not None}

        def decode_group(group: list[int]) -> None:
            self.pipe.feed_input("encoded", [np.frombuffer(encoded[i], np.uint8) for i in group])
            self.pipe.feed_input("anchor", [window[i, :2].astype(np.int32) for i in group])
            self.pipe.feed_input("shape", [(window[i, 2:] - window[i, :2]).astype(np.int32) for i in group])
            (out,) = self.pipe.run()
            out = out.as_cpu() if self.device == "gpu" else out
            for k, i in enumerate(group):
                crops[i] = _cut(out.at(k), regions[i] - np.tile(window[i, :2], 2))  # at(): a host copy

        good = [i for i in range(len(encoded)) if i not in errors]
        for start in range(0, len(good), self.max_batch):
            decode_isolating(decode_group, good[start:start + self.max_batch], errors, self._rebuild)
        for i in sorted(errors):  # What DALI rejects gets a second chance on Pillow (e.g. GIF).
            try:
                image = np.asarray(pillow_upright(encoded[i]))
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
                errors[i] = f"dali: {errors[i]}; pillow: {_pillow_message(exc)}"[:500]
                continue
            h, w = image.shape[:2]
            x1, y1, x2, y2 = (int(v) for v in window[i])
            if 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h:
                crops[i] = _cut(image, regions[i])
                del errors[i]
            else:
                errors[i] = f"dali: {errors[i]}; pillow: a region is outside the {w}x{h} image"
        return crops, errors


def _cut(image: np.ndarray, regions: np.ndarray) -> list[np.ndarray]:
    return [image[y1:y2, x1:x2] for x1, y1, x2, y2 in regions.tolist()]


def decode_isolating(decode_group, idx: list[int], errors: dict[int, str], rebuild,
                     error: RuntimeError | None = None) -> None:
    """Decode the samples `idx` with `decode_group(group)`, which stores what it decodes and raises
    RuntimeError when DALI rejects the group; `rebuild()` replaces the pipeline after a failure.
    The bad samples end in `errors` (index -> message), the rest are decoded. `error`: the
    failure of `idx` as a whole, when already tried.

    When DALI names the sample that failed ("Failed to decode sample #k", a corrupt image),
    the others are decoded again together; otherwise the group is bisected, so the good
    images still decode in parallel groups.
    """
    if not idx:
        return
    if error is None:
        try:
            decode_group(idx)
            return
        except RuntimeError as exc:
            rebuild()
            error = exc
    if len(idx) == 1:
        errors[idx[0]] = _dali_message(error)
        return
    named = re.search(r"Failed to decode sample #(\d+)", str(error))
    if named and int(named.group(1)) < len(idx):
        bad = idx[int(named.group(1))]
        errors[bad] = _dali_message(error)
        groups = [[i for i in idx if i != bad]]
    else:
        groups = [idx[:len(idx) // 2], idx[len(idx) // 2:]]
    for group in groups:
        decode_isolating(decode_group, group, errors, rebuild)


def _parse_error(data: bytes) -> str | None:
    """Why DALI's image parser (nvImageCodec) can't read this header; None when it can."""
    try:
        nvimgcodec.CodeStream(data).codec_name  # reading an attribute forces the parse
    except RuntimeError as exc:
        return f"nvImageCodec can't parse it ({exc})"
    return None


def _to_host(tensor) -> np.ndarray:
    """A DALI output tensor (CPU or GPU) as a host array."""
    return np.asarray(tensor.as_cpu() if hasattr(tensor, "as_cpu") else tensor)


def pillow_letterbox(data: bytes, batch: Batch, i: int, out_dtype=np.float32,
                     norm: InputNorm = InputNorm()) -> np.ndarray:
    """The CPU fallback: image `i` of `batch` decoded with Pillow into the same [3,H,W] letterbox
    as the DALI graph (EXIF orientation applied, first frame of an animation, alpha dropped).

    Pixel values can differ slightly from DALI's (another resampler); geometry is identical,
    so boxes map back the same way.
    """
    pixels = pillow_pixels(data, norm)
    if batch.tiles is not None:  # a tile: its window of the upright image
        x, y = int(batch.tiles.x[i]), int(batch.tiles.y[i])
        pixels = pixels[y:y + int(batch.height[i]), x:x + int(batch.width[i])]
    return _letterbox_pixels(pixels, batch, i, out_dtype, norm)


def _letterbox_pixels(pixels: np.ndarray, batch: Batch, i: int, out_dtype, norm: InputNorm) -> np.ndarray:
    """Item `i`'s upright HWC uint8 pixels (in the model's channel order) into its [3,H,W]
    letterbox: resized (Pillow, bilinear) when its size changes, placed on the grey pad,
    normalised as the DALI graph does."""
    lb = batch.letterbox
    h, w = batch.input_hw
    new_w, new_h, top, left = int(lb.new_w[i]), int(lb.new_h[i]), int(lb.top[i]), int(lb.left[i])
    if pixels.shape[:2] != (new_h, new_w):
        pixels = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.full((h, w, 3), PAD_VALUE, np.uint8)
    canvas[top:top + new_h, left:left + new_w] = pixels
    return normalise(canvas.transpose(2, 0, 1), norm).astype(out_dtype, copy=False)


def pillow_pixels(data: bytes, norm: InputNorm) -> np.ndarray:
    """`data` decoded by Pillow (`pillow_upright`) as HWC uint8 in the model's channel order, as
    DALI's decoders write it (BGR: a view with the channels reversed, no copy)."""
    rgb = np.asarray(pillow_upright(data))
    return rgb[..., ::-1] if norm.bgr else rgb


def pillow_upright(data: bytes) -> Image.Image:
    """`data` decoded by Pillow as DALI decodes it: RGB, EXIF orientation applied, first frame of
    an animation, alpha dropped. Raises what Pillow raises for a broken file."""
    with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
        warnings.simplefilter("ignore")  # e.g. palette transparency notes: not errors
        im.seek(0)  # first frame of an animated GIF / WebP / multi-page TIFF
        im.load()  # decode now: this is where a broken file raises
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image (as in imageinfo)
            upright = im
        return _to_rgb(upright)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; 16-bit and 32-bit gray are scaled, not clipped."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


# nvImageCodec's status codes (nvimgcodecStatus_t), shown by DALI as "nvImageCodec failure: '#N'".
_NVIMGCODEC_STATUS = {2: "invalid parameter", 3: "bad code stream", 4: "code stream not supported", 5: "allocator failure",
                      6: "execution failed", 9: "implementation not supported"}


def _dali_message(exc: Exception) -> str:
    """DALI's message without its traceback: the operator and what it encountered."""
    text = str(exc)
    operator = re.search(r"operator `([^`]+)`", text)
    after = text.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in after.splitlines() if ln.strip() and "no longer valid" not in ln]
    message = lines[0] if lines else type(exc).__name__
    # "sample #N" counts within the isolating run, not the batch: drop it.
    message = re.sub(r"Failed to decode sample #\d+\s*:?\s*$", "failed to decode", message)
    code = re.search(r"nvImageCodec failure: '#(\d+)'", message)
    if code and int(code.group(1)) in _NVIMGCODEC_STATUS:
        message += f" ({_NVIMGCODEC_STATUS[int(code.group(1))]})"
    return (f"{operator.group(1)}: {message}" if operator else message)[:500]


def _pillow_message(exc: Exception) -> str:
    # Drop object addresses ("<_io.BytesIO object at 0x...>"): a re-run must give the same row.
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
