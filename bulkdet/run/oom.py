"""Out of memory during inference: halve the batch and retry, instead of failing the run.

An allocation failure depends on the batch size, not on the images: the same images in
smaller pieces succeed. The size that worked becomes the limit for the rest of the run, so
a run that hit the memory ceiling once does not pay a failed attempt on every batch.

Several inference workers share the memory, so a batch can fail because of what the others
hold at that moment. One image that fails is therefore tried once more alone, while no
other call runs; only if it fails alone is the run out of memory.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger("bulkdet")

# How allocation failures read: ONNX Runtime's arena (CPU and CUDA), CUDA, cuDNN, TensorRT, C++.
_OOM_MARKERS = ("failed to allocate memory", "out of memory", "bad_alloc", "available memory of",
                "cudaerrormemoryallocation", "cuda_error_out_of_memory", "cudnn_status_alloc_failed",
                "outofmemory", "out_of_memory")


class OutOfMemory(RuntimeError):
    """Even one image at a time does not fit: the run can't go on (exit code 1)."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


class HalvingInfer:
    """Wraps `infer(tensor) -> list of arrays` (batch-major); splits batches that run out of memory.

    Thread-safe: the pipeline's inference workers share one.
    """

    def __init__(self, infer):
        self.infer = infer
        self.limit: int | None = None  # largest batch to try; None until memory ran out once
        self.splits = 0  # batches that had to be split (reported in run.json)
        self._turns = threading.Condition()
        self._running = 0  # calls of `infer` in progress
        self._alone = False  # a call waits to run, or runs, with no other call beside it

    def __call__(self, tensor) -> list[np.ndarray]:
        n = len(tensor)
        size = min(n, self.limit or n)
        split = alone = False
        while True:
            try:
                pieces = [self._infer(tensor[i:i + size], alone) for i in range(0, n, size)]
                break
            except Exception as exc:  # noqa: BLE001 - re-raised below unless it is an allocation failure
                if not is_out_of_memory(exc):
                    raise
                if size == 1:
                    if alone:
                        raise OutOfMemory(f"out of memory with a batch of one image: {exc}") from exc
                    log.warning("out of memory with one image; retrying with no other inference beside it")
                    alone = True
                    continue
                split = True
                log.warning("out of memory at batch size %d; retrying in batches of %d", size, (size + 1) // 2)
                size = (size + 1) // 2
        if split:
            with self._turns:
                self.splits += 1
                self.limit = size
        if len(pieces) == 1:
            return pieces[0]
        return [np.concatenate(outputs) for outputs in zip(*pieces)]

    def _infer(self, tensor, alone: bool) -> list[np.ndarray]:
        """`infer(tensor)`; `alone`: once the calls running now have ended, and none beside it."""
        with self._turns:
            self._turns.wait_for(lambda: not self._alone)
            if alone:
                self._alone = True  # no call starts from now on
                self._turns.wait_for(lambda: self._running == 0)
            self._running += 1
        try:
            return self.infer(tensor)
        finally:
            with self._turns:
                self._running -= 1
                if alone:
                    self._alone = False
                self._turns.notify_all()
