"""The interface every backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    name: str  # e.g. "onnxruntime"
    provider: str  # what actually runs it, e.g. "CPUExecutionProvider"

    def infer(self, images) -> list[np.ndarray]:
        """Run the model on a [B,3,H,W] batch; returns the outputs as host arrays."""
        ...
