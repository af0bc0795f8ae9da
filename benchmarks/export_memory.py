"""Does `bulkdet export` keep memory flat as runs grow? Peak RSS at 1 and 10 million detections.

A run folder is written by the run's own writer (RunSink: the same parts, commits and
run.json a run makes) with synthetic detections, 100 per image in parts of 4096 images; each
format is then exported by `bulkdet export` in a child process that reports its own peak
resident memory (ru_maxrss) and wall time. Flat memory: the 10M peak is about the 1M peak.

    python -m benchmarks.export_memory [--sizes 1000000 10000000] [--formats csv megadetector ...]
        [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bulkdet.run.postprocess import Detections
from bulkdet.store.atomic import write_json_atomic
from bulkdet.store.parts import RunSink

PER_IMAGE = 100
NAMES = {i: f"class{i}" for i in range(10)}


def make_run(run_dir: Path, detections: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "detections").mkdir()
    sink = RunSink(run_dir, NAMES, {"bulkdet.run_id": "bench"}, commit_images=4096)
    images = detections // PER_IMAGE
    chunk = 1024
    for start in range(0, images, chunk):
        n = min(chunk, images - start)
        dets = []
        for _ in range(n):
            xy = rng.uniform(0, 1500, (PER_IMAGE, 2)).astype(np.float32)
            wh = rng.uniform(5, 400, (PER_IMAGE, 2)).astype(np.float32)
            dets.append(Detections(np.concatenate([xy, xy + wh], 1), rng.uniform(0.25, 1, PER_IMAGE).astype(np.float32),
                                   rng.integers(0, 10, PER_IMAGE).astype(np.int16)))
        ids = list(range(start, start + n))
        sink.add_images(start // 65536, ids, [f"cam{i % 50:02d}/img_{i:08d}.jpg" for i in ids], [2000] * n, [1500] * n,
                        ["ok"] * n, [None] * n, dets)
    sink.close()
    write_json_atomic({"run_id": "bench", "state": "complete", "finished": time.time(),
                       "config": {"conf": 0.25, "iou": 0.45, "imgsz": 640, "max_det": 300},
                       "model": {"path": "synthetic.onnx", "names": NAMES}}, run_dir / "run.json")


def export_in_child(run_dir: Path, fmt: str, out: Path) -> dict:
    code = ("import resource, sys, time; from bulkdet.results.export import export; t = time.perf_counter(); "
            f"s = export({str(run_dir)!r}, {fmt!r}, {str(out)!r}, quiet=True); "
            "print(s.detections, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, wall, rss_kb = done.stdout.split()
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    return {"format": fmt, "detections": int(n), "wall_s": round(float(wall), 1),
            "peak_rss_mb": round(int(rss_kb) / 1024), "output_mb": round(size / 1e6)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--formats", nargs="+", default=["csv", "megadetector", "coco", "labelstudio", "yolo"])
    ap.add_argument("--tmp", type=Path, default=None, help="Scratch folder (default: the system's).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in args.sizes:
            run_dir = Path(tmp) / f"run-{size}"
            t = time.perf_counter()
            make_run(run_dir, size)
            print(f"{size:,} detections written in {time.perf_counter() - t:.0f} s", flush=True)
            for fmt in args.formats:
                out = Path(tmp) / f"out-{size}.{fmt}"
                r = export_in_child(run_dir, fmt, out)
                results.append(r)
                print(json.dumps(r), flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    report = {"machine": platform.platform(), "python": platform.python_version(),
              "cpu_peak_rss_parent_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
