"""How `bulkdet run --ray` scales with CPU workers: 1 vs 2 workers on the same data, one cluster.

    python -m benchmarks.ray_scaling [--images 240] [--rounds 3] [--shard-size-mb 32] [--max-batch 8]

Data: the demo's varied images (64..2000 px, JPEG and PNG) and the analytic detector, packed
into shards of several batches each (a shard's pipeline fills and drains once, so shards of a
single batch would measure that, not throughput). One local Ray cluster (all cores) serves
every configuration; configurations alternate round by round so a change in machine load
hits them alike. Throughput is the steady one from metrics.parquet (first read to last
write, as `bulkdet report` shows it); wall also counts starting the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bulkdet.synthetic import build_analytic_detector, make_demo_images
from bulkdet.ingest.pack import pack
from bulkdet.results.report import summarize
from bulkdet.run.runner import RunConfig, run

DATA = Path(__file__).resolve().parent / "data" / "ray-scaling"

# name -> (Ray workers or None for a local run, threads per worker or None for the default)
CONFIGS = {
    "local": (None, None),
    "ray 1 worker x all cores": (1, None),
    "ray 1 worker x 1 thread": (1, 1),
    "ray 2 workers x 1 thread": (2, 1),
}


def prepare(n: int, shard_mb: float) -> tuple[Path, Path]:
    marker = DATA / f"made-{n}-{shard_mb}"
    if not marker.exists():
        import shutil

        shutil.rmtree(DATA, ignore_errors=True)
        make_demo_images(DATA / "images", n=n, truth_path=DATA / "truth.json")
        pack(DATA / "images", DATA / "ds", shard_size_mb=shard_mb, quiet=True)
        build_analytic_detector(DATA / "model.onnx")
        marker.touch()
    return DATA / "ds", DATA / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-size-mb", type=float, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from bulkdet.run.distributed import run_on_ray

    dataset, model = prepare(args.images, args.shard_size_mb)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    per_config: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    try:
        for r in range(args.rounds):
            for name, (workers, threads) in CONFIGS.items():
                cfg = RunConfig(dataset, model, DATA / "run", overwrite=True, quiet=True, max_batch=args.max_batch,
                                dali_threads=threads, infer_threads=threads)
                t = time.perf_counter()
                summary = run(cfg) if workers is None else run_on_ray(cfg, workers=workers)
                wall = time.perf_counter() - t
                s = summarize(DATA / "run")
                assert summary.images == args.images and s["failed"] == 0
                per_config[name].append({"wall_s": wall, "images_per_s": s["images_per_s"]})
                print(f"round {r + 1}: {name:28s} {s['images_per_s']:7.1f} img/s steady, {wall:6.1f} s wall",
                      flush=True)
    finally:
        ray.shutdown()

    med = {name: {k: statistics.median(x[k] for x in runs) for k in ("images_per_s", "wall_s")}
           for name, runs in per_config.items()}
    ips = {name: m["images_per_s"] for name, m in med.items()}
    ratios = {
        "2 workers / 1 worker, 1 thread each": ips["ray 2 workers x 1 thread"] / ips["ray 1 worker x 1 thread"],
        "2 workers x 1 thread / 1 worker x all cores": ips["ray 2 workers x 1 thread"]
        / ips["ray 1 worker x all cores"],
        "ray 1 worker / local run (same threads)": ips["ray 1 worker x all cores"] / ips["local"],
    }
    print(f"\n{args.images} images, {os.cpu_count()} cores, median of {args.rounds} round(s):")
    for name, m in med.items():
        print(f"  {name:28s} {m['images_per_s']:7.1f} img/s steady, {m['wall_s']:6.1f} s wall")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    out = DATA / "results.json"
    out.write_text(json.dumps({"images": args.images, "cores": os.cpu_count(), "median": med, "ratios": ratios,
                               "runs": per_config}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
