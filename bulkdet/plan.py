"""Batches from the manifest: which images go together, at which input shape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Letterbox:
    """Per-image geometry of a batch: resize to (new_h, new_w), paste at (top, left)."""

    new_w: np.ndarray  # int32 [B]
    new_h: np.ndarray
    left: np.ndarray
    top: np.ndarray

    def scale(self, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input pixels per original pixel, per axis (exact, after rounding the resize)."""
        return self.new_w / width, self.new_h / height


def letterbox(width: np.ndarray, height: np.ndarray, input_h: int, input_w: int) -> Letterbox:
    """Keep aspect, fit inside (input_h, input_w), centre on gray padding."""
    width = np.asarray(width, np.float64)
    height = np.asarray(height, np.float64)
    r = np.minimum(input_h / height, input_w / width)
    new_w = np.clip(np.round(width * r), 1, input_w).astype(np.int32)
    new_h = np.clip(np.round(height * r), 1, input_h).astype(np.int32)
    return Letterbox(new_w, new_h, (input_w - new_w) // 2, (input_h - new_h) // 2)


@dataclass(frozen=True)
class Batch:
    batch_id: int
    shard: int
    image_ids: np.ndarray  # int64 [B]
    paths: list[str]
    keys: list[bytes]
    width: np.ndarray  # upright original size, int32 [B]
    height: np.ndarray
    input_hw: tuple[int, int]
    letterbox: Letterbox

    def __len__(self) -> int:
        return len(self.image_ids)


def plan_batches(images: pa.Table, input_hw: tuple[int, int], max_batch: int) -> list[Batch]:
    """Fixed-size batches at one square input shape, in shard order (reads stay local)."""
    images = images.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    cols = {name: images.column(name).to_numpy(zero_copy_only=False) for name in
            ("image_id", "shard", "width", "height")}
    paths = images.column("path").to_pylist()
    keys = images.column("key").to_pylist()
    batches = []
    start = 0
    n = len(images)
    while start < n:
        shard = cols["shard"][start]
        end = start + 1
        while end < n and end - start < max_batch and cols["shard"][end] == shard:
            end += 1
        w = cols["width"][start:end].astype(np.int32)
        h = cols["height"][start:end].astype(np.int32)
        batches.append(Batch(len(batches), int(shard), cols["image_id"][start:end].astype(np.int64),
                             paths[start:end], keys[start:end], w, h, input_hw,
                             letterbox(w, h, *input_hw)))
        start = end
    return batches
