"""How much does always-on metrics recording cost? (target: < 1 % of run time)

1. Micro: `MetricsRecorder.record()` on a 32-image batch, streamed to a Parquet file (row
   groups flushed and the file committed, as in a run): microseconds per batch.
2. In a real run (pack -> run with the analytic detector) made of many small batches, the
   worst case for a per-batch cost: the time spent in record() and close(), measured
   inside the run, as a share of the run's wall time and of the mean batch interval.

    python -m benchmarks.metrics_overhead [--images 600] [--batch 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import bulkdet.run.runner
from bulkdet.synthetic import build_analytic_detector, random_rects, write_image
from bulkdet.run.metrics import STAGES, BatchTimes, MetricsRecorder
from bulkdet.ingest.pack import pack
from bulkdet.run.plan import Batch, letterbox


class TimedRecorder(MetricsRecorder):
    """The real recorder, with the time spent in it added up."""

    record_s = 0.0  # per batch, in the write stage's thread
    close_s = 0.0  # once, at the end: last row group, footer, fsync, rename
    calls = 0

    def record(self, *args, **kwargs):
        t = time.perf_counter()
        super().record(*args, **kwargs)
        TimedRecorder.record_s += time.perf_counter() - t
        TimedRecorder.calls += 1

    def close(self):
        t = time.perf_counter()
        try:
            return super().close()
        finally:
            TimedRecorder.close_s += time.perf_counter() - t


def micro(tmp: Path, n: int = 20_000, size: int = 32) -> float:
    rng = np.random.default_rng(0)
    w = rng.integers(320, 1920, size).astype(np.int32)
    h = rng.integers(240, 1080, size).astype(np.int32)
    batch = Batch(0, 0, np.arange(size, dtype=np.int64), [f"p{i}" for i in range(size)], [b""] * size,
                  w, h, (384, 640), letterbox(w, h, 384, 640))
    times = BatchTimes()
    now = time.perf_counter()
    for k, stage in enumerate(STAGES):
        times.start[stage], times.end[stage], times.queue_depth[stage] = now + k, now + k + 0.5, 1
    rec = MetricsRecorder("cpu", tmp / "micro.parquet", "bench")
    t = time.perf_counter()
    for _ in range(n):
        rec.record(batch, times, 0, 123_456)
    rec.close()
    return (time.perf_counter() - t) / n


def real_run(tmp: Path, images: int, batch: int) -> dict:
    rng = np.random.default_rng(1)
    (tmp / "src").mkdir()
    for i in range(images):
        w, h = int(rng.integers(96, 200)), int(rng.integers(96, 200))
        write_image(tmp / "src" / f"{i:05d}.jpg", w, h, random_rects(w, h, 2, rng), fmt="jpeg", seed=i)
    pack(tmp / "src", tmp / "ds", quiet=True)
    model = build_analytic_detector(tmp / "analytic.onnx")
    bulkdet.run.runner.MetricsRecorder = TimedRecorder  # the runner builds its recorder from this name
    summary = bulkdet.run.runner.run(bulkdet.run.runner.RunConfig(tmp / "ds", model, tmp / "run", imgsz=160,
                                                          max_batch=batch, quiet=True))
    batches = TimedRecorder.calls
    spent = TimedRecorder.record_s + TimedRecorder.close_s
    return {"images": images, "batch": batch, "batches": batches, "run_wall_s": summary.wall_s,
            "record_s": TimedRecorder.record_s, "close_s": TimedRecorder.close_s,
            "share_of_run": spent / summary.wall_s, "record_share_of_run": TimedRecorder.record_s / summary.wall_s,
            "record_us_per_batch": TimedRecorder.record_s / batches * 1e6,
            "mean_batch_interval_ms": summary.wall_s / batches * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        per_call = micro(tmp)
        run = real_run(tmp, args.images, args.batch)
    result = {"machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
              "micro_record_us_per_batch_of_32": per_call * 1e6, "run": run}
    print(f"record(): {per_call * 1e6:.1f} us per batch of 32 images (streamed to Parquet, incl. flush and commit)")
    print(f"in a run of {run['images']} images in {run['batches']} batches of {run['batch']} "
          f"({run['run_wall_s']:.2f} s, {run['mean_batch_interval_ms']:.1f} ms per batch):")
    print(f"  record(): {run['record_us_per_batch']:.0f} us per batch, {run['record_s'] * 1e3:.1f} ms in all "
          f"= {run['record_share_of_run']:.3%} of the run")
    print(f"  close() once at the end: {run['close_s'] * 1e3:.1f} ms; "
          f"all metrics work = {run['share_of_run']:.3%} of the run")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
