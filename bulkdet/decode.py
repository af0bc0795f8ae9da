"""DALI letterbox pipeline: encoded bytes -> upright, resized, padded, normalised CHW tensor.

One graph for both devices: `cpu` decodes on the host, `gpu` uses DALI's "mixed" decoder
(nvJPEG / hardware decoder) and keeps everything after it on the GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from bulkdet.plan import Batch

PAD_VALUE = 114
_DALI_DTYPES = {np.float32: types.FLOAT, np.float16: types.FLOAT16}


@dataclass
class DecodedBatch:
    batch: Batch
    tensor: object  # np.ndarray [B,3,H,W] on cpu; a DALI TensorGPU on gpu
    errors: dict[int, str] = field(default_factory=dict)  # index in batch -> decoder message


@pipeline_def
def _letterbox_graph(decoder_device: str, out_dtype, hw_decoder_load: float | None = None):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    resize_hw = fn.external_source(name="resize_hw", dtype=types.FLOAT, ndim=1)
    anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
    shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
    # adjust_orientation (default on) applies EXIF orientation: output is upright.
    images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB,
                               **_mixed_options(decoder_device, hw_decoder_load))
    images = fn.resize(images, size=resize_hw, antialias=True, interp_type=types.INTERP_LINEAR)
    # A window starting at (-top, -left): the image lands centred, the rest is gray padding.
    images = fn.slice(images, anchor, shape, axis_names="HW", out_of_bounds_policy="pad",
                      fill_values=PAD_VALUE, normalized_anchor=False, normalized_shape=False)
    return fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW", mean=[0.0], std=[255.0])


def _mixed_options(decoder_device: str, hw_decoder_load: float | None) -> dict:
    """The share of JPEGs the GPU decoder sends to the hardware JPEG decoder (A100/H100 have
    one); DALI's default when None. The CPU decoder takes no such option."""
    if decoder_device != "mixed" or hw_decoder_load is None:
        return {}
    return {"hw_decoder_load": hw_decoder_load}


class Decoder:
    """Decodes whole batches; when DALI rejects a batch, isolates the bad images."""

    def __init__(self, device: str = "cpu", max_batch: int = 32, num_threads: int | None = None,
                 out_dtype=np.float32, device_id: int = 0, hw_decoder_load: float | None = None):
        self.device = device
        self.hw_decoder_load = hw_decoder_load
        self.max_batch = max_batch
        self.num_threads = num_threads or max(1, os.cpu_count() or 1)
        self.out_dtype = out_dtype
        self.device_id = device_id
        self.pipe = self._build()

    def _build(self):
        pipe = _letterbox_graph(
            decoder_device="mixed" if self.device == "gpu" else "cpu",
            out_dtype=_DALI_DTYPES[np.dtype(self.out_dtype).type], hw_decoder_load=self.hw_decoder_load,
            batch_size=self.max_batch, num_threads=self.num_threads,
            device_id=self.device_id if self.device == "gpu" else None,
            prefetch_queue_depth=1, exec_async=False, exec_pipelined=False,
        )
        pipe.build()
        return pipe

    def _run(self, encoded: list[bytes], batch: Batch, idx: list[int]):
        lb = batch.letterbox
        h, w = batch.input_hw
        self.pipe.feed_input("encoded", [np.frombuffer(encoded[i], np.uint8) for i in idx])
        self.pipe.feed_input("resize_hw", [np.array([lb.new_h[i], lb.new_w[i]], np.float32) for i in idx])
        self.pipe.feed_input("anchor", [np.array([-lb.top[i], -lb.left[i]], np.int32) for i in idx])
        self.pipe.feed_input("shape", [np.array([h, w], np.int32) for _ in idx])
        (out,) = self.pipe.run()
        return out.as_tensor()

    def decode(self, batch: Batch, encoded: list[bytes]) -> DecodedBatch:
        idx = list(range(len(batch)))
        try:
            return DecodedBatch(batch, self._to_output(self._run(encoded, batch, idx)))
        except RuntimeError:
            self.pipe = self._build()  # a pipeline that raised is not reused
        # Isolate the bad images one by one; the good ones are decoded again together.
        errors = {}
        for i in idx:
            try:
                self._run(encoded, batch, [i])
            except RuntimeError as exc:
                errors[i] = _dali_message(exc)
                self.pipe = self._build()
        good = [i for i in idx if i not in errors]
        h, w = batch.input_hw
        tensor = np.full((len(batch), 3, h, w), PAD_VALUE / 255.0, dtype=self.out_dtype)
        if good:
            tensor[good] = np.asarray(self._to_output(self._run(encoded, batch, good)))
        return DecodedBatch(batch, tensor, errors)

    def _to_output(self, tensor):
        return np.array(tensor) if self.device == "cpu" else tensor


def _dali_message(exc: Exception) -> str:
    """DALI's message without its traceback: the operator and what it encountered."""
    text = str(exc)
    operator = re.search(r"operator `([^`]+)`", text)
    after = text.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in after.splitlines() if ln.strip() and "no longer valid" not in ln]
    message = lines[0] if lines else type(exc).__name__
    return (f"{operator.group(1)}: {message}" if operator else message)[:500]
