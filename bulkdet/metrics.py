"""Per-batch measurements, collected by the runner and written to metrics.parquet."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa

from bulkdet.atomic import write_parquet_atomic

STAGES = ("read", "decode", "infer", "postprocess", "write")


@dataclass
class BatchTimes:
    """Start/end (perf_counter seconds) of each stage for one batch, plus queue depths seen."""

    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)

    def busy(self, stage: str) -> float:
        return self.end.get(stage, 0.0) - self.start.get(stage, 0.0)


class MetricsRecorder:
    def __init__(self, device: str):
        self.device = device
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []

    def record(self, batch, times: BatchTimes, failed: int) -> None:
        lb = batch.letterbox
        h, w = batch.input_hw
        input_pixels = len(batch) * h * w
        image_pixels = int((lb.new_w.astype("int64") * lb.new_h).sum())
        row = {
            "batch_id": batch.batch_id, "shard": batch.shard, "input_h": h, "input_w": w,
            "batch_size": len(batch), "failed": failed,
            "original_pixels": int((batch.width.astype("int64") * batch.height).sum()),
            "input_pixels": input_pixels, "padding_pixels": input_pixels - image_pixels,
            "device": self.device,
        }
        for stage in STAGES:
            row[f"{stage}_start"] = times.start.get(stage, 0.0) - self.t0
            row[f"{stage}_end"] = times.end.get(stage, 0.0) - self.t0
            row[f"{stage}_s"] = times.busy(stage)
        for stage in STAGES:
            row[f"{stage}_queue"] = times.queue_depth.get(stage, 0)
        self.rows.append(row)

    def stage_totals(self) -> dict[str, float]:
        return {s: sum(r[f"{s}_s"] for r in self.rows) for s in STAGES}

    def write(self, path) -> None:
        if self.rows:
            write_parquet_atomic(pa.Table.from_pylist(self.rows), path)
