"""Per-batch measurements, collected by the runner and written to metrics.parquet.

One row per batch: which bucket shape it ran at, how many images and pixels it held, how much
of the computed input was padding, when each stage started and ended and how long it was busy,
how many batches waited in front of each stage, and the device. Recording is always on, so it
must stay cheap: a row is a handful of numpy sums and a dict (a few microseconds; measured by
benchmarks/metrics_overhead.py). Rows are streamed to a temporary Parquet file in row groups of
`FLUSH_ROWS`, so memory does not grow with the run, and the file is renamed into place at the end.
A resumed run keeps the rows of earlier invocations (told apart by `run_id`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bulkdet.store.atomic import commit, temporary_path

log = logging.getLogger("bulkdet")

# The stages of `bulkdet run`, in pipeline order: the one list of their names (the runner's
# pipeline, the metrics columns and the report's hints follow it).
STAGES = ("read", "decode", "infer", "postprocess", "write")
FLUSH_ROWS = 1024  # rows held in memory before they become one Parquet row group


def metrics_schema() -> pa.Schema:
    fields = [
        ("run_id", pa.string()),  # the invocation of `bulkdet run` (a resumed run has several)
        ("batch_id", pa.int64()),
        ("shard", pa.int32()),
        ("device", pa.string()),
        ("input_h", pa.int32()),  # the bucket shape the batch was computed at
        ("input_w", pa.int32()),
        ("batch_size", pa.int32()),
        ("images", pa.int32()),  # distinct images of the batch's items (fewer than batch_size with --tile)
        ("tiles", pa.int32()),  # items that are tiles of a tiled image (0 without --tile)
        ("images_written", pa.int32()),  # images whose row this batch completed (their last item was in it)
        ("failed", pa.int32()),  # images of the batch that could not be decoded
        ("encoded_bytes", pa.int64()),  # bytes read from the shards
        ("original_pixels", pa.int64()),  # sum of width * height of the originals (upright)
        ("input_pixels", pa.int64()),  # batch_size * input_h * input_w: what the engine computed
        ("padding_pixels", pa.int64()),  # input_pixels minus the letterboxed image area
    ]
    for stage in STAGES:  # seconds since the invocation started; busy = end - start
        fields += [(f"{stage}_start", pa.float64()), (f"{stage}_end", pa.float64()), (f"{stage}_s", pa.float64())]
    for stage in STAGES:  # batches waiting in the stage's input queue when it took this one
        fields.append((f"{stage}_queue", pa.int32()))
    return pa.schema(fields)


@dataclass
class BatchTimes:
    """Start/end (perf_counter seconds) of each stage for one batch, plus queue depths seen."""

    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)

    def busy(self, stage: str) -> float:
        return self.end.get(stage, 0.0) - self.start.get(stage, 0.0)


class MetricsRecorder:
    """Collects one row per batch; `path` given: streams them to that Parquet file, else keeps
    them in `rows` (a Ray worker hands them to the driver).

    `close()` commits the file (fsync, rename); until then the previous metrics.parquet, if
    any, is untouched, and its rows are carried over into the new file first.
    """

    def __init__(self, device: str, path: Path | None = None, run_id: str = ""):
        self.device = device
        self.run_id = run_id
        self.schema = metrics_schema()
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.batches = 0
        self.path = Path(path) if path is not None else None
        self._writer = None
        self._written = 0  # rows in the file so far
        self._tmp = None
        if self.path is not None:
            self._tmp = temporary_path(self.path)
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
            self._carry_over_previous()

    def _carry_over_previous(self) -> None:
        if not self.path.exists():
            return
        previous = pq.ParquetFile(self.path)
        if previous.schema_arrow != self.schema:
            log.warning("metrics of earlier invocations in %s have another schema; not kept", self.path)
            return
        for group in range(previous.num_row_groups):
            table = previous.read_row_group(group)
            self._writer.write_table(table)
            self._written += len(table)

    def record(self, batch, times: BatchTimes, failed: int, encoded_bytes: int = 0,
               images_written: int | None = None) -> None:
        lb = batch.letterbox
        h, w = batch.input_hw
        input_pixels = len(batch) * h * w
        image_pixels = int((lb.new_w.astype("int64") * lb.new_h).sum())
        row = {
            "run_id": self.run_id, "batch_id": batch.batch_id, "shard": batch.shard, "device": self.device,
            "input_h": h, "input_w": w, "batch_size": len(batch),
            "images": len(set(batch.image_ids.tolist())) if batch.tiles is not None else len(batch),
            "tiles": int(batch.tiles.tile.sum()) if batch.tiles is not None else 0,
            "images_written": len(batch) if images_written is None else images_written, "failed": failed,
            "encoded_bytes": encoded_bytes,
            "original_pixels": int((batch.width.astype("int64") * batch.height).sum()),
            "input_pixels": input_pixels, "padding_pixels": input_pixels - image_pixels,
        }
        t0 = self.t0
        for stage in STAGES:
            start = times.start.get(stage)
            end = times.end.get(stage)
            busy = end - start if start is not None and end is not None else 0.0
            row[f"{stage}_start"] = start - t0 if start is not None else None
            row[f"{stage}_end"] = end - t0 if end is not None else None
            row[f"{stage}_s"] = busy
            row[f"{stage}_queue"] = times.queue_depth.get(stage)
            self.totals[stage] += busy
        self.batches += 1
        self.rows.append(row)
        if self._writer is not None and len(self.rows) >= FLUSH_ROWS:
            self._flush()

    def add_rows(self, rows: list[dict]) -> None:
        """Rows recorded by another process (a Ray worker), already on this recorder's clock."""
        for row in rows:
            self.rows.append({**row, "run_id": self.run_id, "batch_id": self.batches})
            for stage in STAGES:
                self.totals[stage] += row[f"{stage}_s"]
            self.batches += 1
            if self._writer is not None and len(self.rows) >= FLUSH_ROWS:
                self._flush()

    def _flush(self) -> None:
        if self.rows:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self._written += len(self.rows)
            self.rows.clear()

    def stage_totals(self) -> dict[str, float]:
        return dict(self.totals)

    def __enter__(self) -> "MetricsRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Commits the rows measured, also after a failure (a resumed run's report shows them);
        when that write fails too (the disk is full), its temporary file goes and the error that
        stopped the run is the one reported."""
        try:
            self.close()
        except OSError:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
            if exc is None:
                raise

    def close(self) -> Path | None:
        """Write what is left and put the file in place; a run with no batch writes nothing new."""
        if self._writer is None:
            return None
        self._flush()
        self._writer.close()
        self._writer = None
        if self._written == 0:
            self._tmp.unlink()
            return None
        return commit(self._tmp, self.path)


def stages_of(table: pa.Table) -> list[str]:
    """The stages a metrics table has columns for, in pipeline order."""
    return [name[: -len("_start")] for name in table.column_names if name.endswith("_start")]
