"""The interface every backend implements."""

from __future__ import annotations

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
