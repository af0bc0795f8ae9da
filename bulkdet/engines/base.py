"""The interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Engine(Protocol):
    name: str  # e.g. "onnxruntime"
    provider: str  # what actually runs it, e.g. "CPUExecutionProvider"
    input_dtype: type  # what the decoder must produce (float32, or float16 for an FP16 model)

    def infer(self, images) -> list[np.ndarray]:
        """Run the model on a [B,3,H,W] batch; returns the outputs as host arrays.

        `images` is a host array, a DALI GPU tensor, or (GPU engines) what `stage` returned.
        """
        ...

    def stage(self, images):
        """Called in the decode thread: GPU engines copy the batch into a device input buffer
        there, so the next batch decodes while this one is inferred; CPU engines return it."""
        ...

    def release(self, images) -> None:
        """Called after inference of a staged batch: GPU engines reuse its input buffer."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class InputSlot:
    """A decoded batch in one ring buffer: what the engine binds as its input.

    Slicing along the batch gives views into the same buffer (the out-of-memory retry splits a
    batch so); only the slot itself (`owner`) goes back to the ring.
    """

    index: int
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: bool = True
    capacity: int | None = None  # rows the buffer holds from `ptr` (None: just `shape[0]`)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> "InputSlot":
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("input slots slice along the batch with step 1 only")
        if (start, stop) == (0, len(self)):
            return self
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        return InputSlot(self.index, self.ptr + start * per_image, (max(stop - start, 0), *self.shape[1:]),
                         self.dtype, owner=False, capacity=(self.capacity or len(self)) - start)

    def widened(self, rows: int) -> "InputSlot":
        """A view of `rows` rows from the same start: the rows past this batch hold whatever the
        buffer held (a fixed-batch model's padding, dropped from its outputs)."""
        if rows > (self.capacity or len(self)):
            raise RuntimeError(f"a batch of {len(self)} at this place of its input buffer can't be padded to "
                               f"the model's fixed batch {rows}")
        return InputSlot(self.index, self.ptr, (rows, *self.shape[1:]), self.dtype, owner=False,
                         capacity=self.capacity)


def fixed_batch(infer, n: int | None):
    """`infer` for a model with a fixed batch `n`: a shorter batch (a shard's last, or a half made by
    run/oom.py) is padded to n rows, and the padding rows are dropped from the outputs."""
    if not n:
        return infer

    def padded(images) -> list[np.ndarray]:
        k = len(images)
        if k == n:
            return infer(images)
        if k > n:
            raise ValueError(f"a batch of {k} images for a model with a fixed batch of {n}")
        if isinstance(images, InputSlot):
            full = images.widened(n)
        else:
            images = np.asarray(images)
            full = np.concatenate([images, np.zeros((n - k, *images.shape[1:]), images.dtype)])
        return [output[:k] for output in infer(full)]

    return padded


def ring_elements(shapes, channels: int = 3) -> int:
    """Elements of the largest input batch among (batch, height, width) shapes."""
    return max(b * channels * h * w for b, h, w in shapes)
