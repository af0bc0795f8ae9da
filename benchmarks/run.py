"""`make bench`: what bulkdet's speed is made of, measured in one run on the same data and model.

    python -m benchmarks.run [--quick] [--images N] [--small 1000 10000]

On one set of JPEGs with a real-world size mix and a YOLOv8n-architecture ONNX model
(random deterministic weights, real compute) it measures:

  a. model only: ONNX Runtime on pre-made tensors, at exactly the batches bulkdet plans;
  b. model only at square 640x640 batches (the same images, letterboxed square);
  c. decode only: DALI decoding + letterboxing the planned batches from memory;
  d. bulkdet end to end (`bulkdet run`, in its own process);
  e. the naive script (benchmarks/naive.py, in its own process);

then the ratios: pipeline efficiency d/a, bucket gain b/a (time), speed-up over naive d/e,
plus peak RSS, the busiest stage, and the cost of 10x the images (1k vs 10k small images
with a tiny model). The measurements run in `--repeat` interleaved rounds and each keeps
its fastest round (the least disturbed by other load; all rounds are in the JSON). Each
also reports CPU time per image, which load from other processes disturbs much less.
Everything is printed as a table and saved as JSON under benchmarks/results/ with a
description of the machine, including its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.dataset import jpeg_folder, make_jpeg_mix, make_small_images
from bulkdet.synthetic import build_analytic_detector
from bulkdet.run.plan import DEFAULT_DECODE_BUDGET, default_pixel_budget, plan
from bulkdet.run.runner import default_threads, environment, usable_cores
from bulkdet.store.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
IMGSZ, MAX_BATCH = 640, 32  # bulkdet's defaults
TARGETS = {"pipeline_efficiency": 0.90, "bucket_gain": 1.3, "speedup_over_naive": 2.5,
           "scaling_10x_time": 10.5, "peak_rss_mb_10k": 1536}


# ------------------------------------------------------------------ measuring

def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _peak_rss_kib(pid: int) -> int | None:
    """VmHWM: the peak resident set of the process's current address space (since exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_process(cmd: list[str], log: Path, poll_s: float = 0.02) -> dict:
    """Run cmd in a child process; its wall time, CPU time (wait4) and peak RSS.

    Peak RSS is VmHWM polled while the child runs: wait4's ru_maxrss would include this
    benchmark process's own memory, inherited through fork before exec.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    peak = 0
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _peak_rss_kib(proc.pid) or 0)
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}; see {log}:\n"
                           + log.read_text()[-2000:])
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak / 1024}


def _throughput(n: int, wall: float, cpu: float, **extra) -> dict:
    return {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s": round(n / wall, 3), "cpu_ms_per_image": round(1000 * cpu / n, 2), **extra}


def model_only(model: Path, the_plan, threads: int, workers: int) -> dict:
    """(a)/(b): the engine bulkdet builds, used as bulkdet uses it (`workers` calls at once,
    `threads` each), on pre-made tensors of the plan's batch shapes, in plan order."""
    from concurrent.futures import ThreadPoolExecutor

    from bulkdet.engines import create_engine

    engine = create_engine("onnxruntime", model, device="cpu", threads=threads)
    sizes = the_plan.batch_sizes().tolist()
    shapes = [(b, int(h), int(w)) for b, (h, w) in zip(sizes, the_plan.input_hw.tolist())]
    rng = np.random.default_rng(0)
    tensors = {s: rng.random((s[0], 3, s[1], s[2]), dtype=np.float32) for s in sorted(set(shapes))}
    for x in tensors.values():  # warm-up: the first run at a shape plans its memory
        engine.infer(x)
    with ThreadPoolExecutor(workers) as pool:
        cpu0, t0 = _cpu_s(), time.perf_counter()
        list(pool.map(lambda s: engine.infer(tensors[s]), shapes))
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return _throughput(sum(sizes), wall, cpu, batches=len(shapes), distinct_shapes=len(tensors),
                       input_megapixels=round(sum(b * h * w for b, h, w in shapes) / 1e6, 2))


def decode_only(dataset: Path, the_plan, threads: int) -> dict:
    """(c): DALI decode + letterbox of the planned batches, encoded bytes already in memory."""
    from bulkdet.run.decode import Decoder
    from bulkdet.store.shards import ShardReader

    reader = ShardReader(dataset / "shards")
    batches = list(the_plan)
    encoded = [reader.get_many(b.shard, b.keys) for b in batches]
    reader.close()
    decoder = Decoder("cpu", int(the_plan.batch_sizes().max()), threads)
    decoder.decode(batches[0], encoded[0])  # warm-up
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for b, data in zip(batches, encoded):
        decoder.decode(b, data)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    megapixels = sum(int((b.width.astype(np.int64) * b.height).sum()) for b in batches) / 1e6
    return _throughput(len(the_plan.image_id), wall, cpu, threads=threads,
                       original_megapixels_per_s=round(megapixels / wall, 2))


def bulkdet_run(dataset: Path, model: Path, out: Path, work: Path, *extra: str) -> dict:
    """(d): `bulkdet run` in its own process; what its run.json and metrics say."""
    from bulkdet.results.report import summarize

    m = measure_process([sys.executable, "-m", "bulkdet", "run", str(dataset), "--model", str(model),
                         "--out", str(out), "--overwrite", "-q", *extra], work / f"{out.name}.log")
    run = json.loads((out / "run.json").read_text())
    s = summarize(out)
    n = run["totals"]["processed"]
    # Busy share per worker: a stage with two workers busy all the time is at 1.0, not 2.0.
    workers = {"infer": (run.get("threads") or {}).get("infer_workers") or 1}
    share = {k: round(v / workers.get(k, 1), 3) for k, v in s["stage_busy_share"].items()}
    return {**_throughput(n, m["wall_s"], m["cpu_s"]), "peak_rss_mb": round(m["peak_rss_mb"], 1),
            "pipeline_span_s": round(s["elapsed_s"], 3),
            "steady_images_per_s": round(s["images_per_s"], 3),
            "busiest_stage": max(share, key=share.get), "stage_busy_share": share,
            "stage_s": {k: round(v, 3) for k, v in s["stage_s"].items()},
            "detections": s["detections"], "failed": s["failed"],
            "threads": run.get("threads"), "plan": run.get("plan")}


def naive_run(images: Path, model: Path, out: Path, work: Path) -> dict:
    """(e): the naive script in its own process."""
    m = measure_process([sys.executable, "-m", "benchmarks.naive", str(images), str(model), str(out)],
                        work / "naive.log")
    import pyarrow.parquet as pq

    n = len(list(images.glob("*.jpg")))
    return {**_throughput(n, m["wall_s"], m["cpu_s"]), "peak_rss_mb": round(m["peak_rss_mb"], 1),
            "detections": pq.read_metadata(out).num_rows}


def pack(images: Path, dataset: Path, work: Path) -> dict:
    shutil.rmtree(dataset, ignore_errors=True)
    m = measure_process([sys.executable, "-m", "bulkdet", "pack", str(images), "--out", str(dataset), "-q"],
                        work / f"pack-{dataset.parent.name}.log")
    return {"wall_s": round(m["wall_s"], 3), "peak_rss_mb": round(m["peak_rss_mb"], 1)}


def prepare_small(n: int, data: Path, work: Path) -> tuple[Path, dict]:
    base = data / f"small-{n}"
    images = jpeg_folder(make_small_images(base / "generated", n), base / "images")
    return base / "dataset", pack(images, base / "dataset", work)


def small_run(n: int, dataset: Path, work: Path, tiny: Path) -> dict:
    """Plan and run n small images with a tiny model (the linear-cost measurement)."""
    good = read_manifest(dataset)
    t0 = time.perf_counter()
    plan(good, 64, MAX_BATCH, pixel_budget=default_pixel_budget("cpu", 64, MAX_BATCH),
         decode_budget=DEFAULT_DECODE_BUDGET)
    plan_s = time.perf_counter() - t0
    run = bulkdet_run(dataset, tiny, work / f"run-small-{n}", work, "--imgsz", "64")
    return {**run, "plan_s": round(plan_s, 4)}


def scaling(sizes: tuple[int, int], r: dict) -> dict:
    """1k vs 10k: run time, pipeline span (without start-up), plan and pack time factors."""
    small, big = sizes
    out = {"images_factor": big / small}
    for n in sizes:
        m = r[f"small_{n}"]
        out[n] = {"pack_s": r["pack_small"][n]["wall_s"], "plan_s": m["plan_s"], "run_s": m["wall_s"],
                  "pipeline_span_s": m["pipeline_span_s"], "run_peak_rss_mb": m["peak_rss_mb"],
                  "images_per_s": m["images_per_s"], "busiest_stage": m["busiest_stage"], "failed": m["failed"]}
    out["run_time_factor"] = round(out[big]["run_s"] / out[small]["run_s"], 3)
    # Without the fixed start-up cost (imports, model, DALI): first read to last write.
    out["pipeline_span_factor"] = round(out[big]["pipeline_span_s"] / out[small]["pipeline_span_s"], 3)
    out["pack_time_factor"] = round(out[big]["pack_s"] / out[small]["pack_s"], 3)
    out["plan_time_factor"] = round(out[big]["plan_s"] / max(out[small]["plan_s"], 1e-9), 3)
    return out


def best_of(runs: list[dict]) -> dict:
    """The fastest repetition (the one least disturbed by other load), with every wall time."""
    best = dict(min(runs, key=lambda m: m["wall_s"]))
    if "peak_rss_mb" in best:
        best["peak_rss_mb"] = max(m["peak_rss_mb"] for m in runs)
    return {**best, "repetitions_wall_s": [m["wall_s"] for m in runs]}


# ------------------------------------------------------------------ describing

def machine() -> dict:
    import psutil

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu_model, "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpu": None,
            "load_average_start": [round(v, 2) for v in os.getloadavg()], **environment()}


def ratios(r: dict) -> dict:
    a, b, c, d, e = (r[k] for k in ("a_model_planned", "b_model_square", "c_decode", "d_bulkdet", "e_naive"))
    big = max(k for k in r["scaling"] if isinstance(k, int))
    return {
        "pipeline_efficiency": round(d["images_per_s"] / a["images_per_s"], 3),
        "pipeline_efficiency_steady": round(d["steady_images_per_s"] / a["images_per_s"], 3),
        "bucket_gain": round(b["wall_s"] / a["wall_s"], 3),
        "bucket_gain_cpu": round(b["cpu_s"] / a["cpu_s"], 3),
        # CPU time per image, a over d: what the efficiency is when both keep every core busy
        # (they do on CPU); much less disturbed by other load than wall time.
        "pipeline_efficiency_cpu": round(a["cpu_ms_per_image"] / d["cpu_ms_per_image"], 3),
        # Without a GPU, decoding takes CPU from the model: the best d can reach is a's CPU
        # time over a's plus c's (a perfect pipeline, free post-processing and start-up).
        "pipeline_efficiency_bound_cpu": round(a["cpu_ms_per_image"]
                                               / (a["cpu_ms_per_image"] + c["cpu_ms_per_image"]), 3),
        # Even a perfect pipeline is no faster than the model alone.
        "speedup_over_naive_bound": round(a["images_per_s"] / e["images_per_s"], 3),
        "speedup_over_naive": round(d["images_per_s"] / e["images_per_s"], 3),
        "scaling_10x_time": r["scaling"]["run_time_factor"],
        "scaling_10x_pipeline_span": r["scaling"]["pipeline_span_factor"],
        "peak_rss_mb_10k": r["scaling"][big]["run_peak_rss_mb"],
    }


def verdicts(rat: dict) -> dict:
    out = {}
    for k, target in TARGETS.items():
        lower_is_better = k in ("scaling_10x_time", "peak_rss_mb_10k")
        out[k] = {"value": rat[k], "target": target,
                  "met": rat[k] <= target if lower_is_better else rat[k] >= target}
    return out


def print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"bulkdet benchmark ({r['settings']['images']} images, best of {r['settings']['repeat']}, "
                    f"{r['machine']['cpu']}, "
                    f"{r['machine']['usable_cores']} cores, load {r['machine']['load_average_start']} -> "
                    f"{r['machine']['load_average_end']})")
    for col in ("measurement", "images/s", "wall s", "cpu ms/img", "peak RSS MB", "note"):
        t.add_column(col, justify="left" if col in ("measurement", "note") else "right")
    rows = [("a. model only, planned buckets", "a_model_planned"), ("b. model only, square 640", "b_model_square"),
            ("c. decode only (DALI)", "c_decode"), ("d. bulkdet end to end", "d_bulkdet"),
            ("e. naive script", "e_naive")]
    for label, key in rows:
        m = r[key]
        note = {"a_model_planned": lambda: f"{m['batches']} batches, {m['input_megapixels']} MP computed",
                "b_model_square": lambda: f"{m['batches']} batches, {m['input_megapixels']} MP computed",
                "c_decode": lambda: f"{m['threads']} threads, {m['original_megapixels_per_s']} MP/s",
                "d_bulkdet": lambda: f"busiest: {m['busiest_stage']}; {m['detections']} detections",
                "e_naive": lambda: f"{m['detections']} detections"}[key]()
        t.add_row(label, f"{m['images_per_s']:.2f}", f"{m['wall_s']:.1f}", f"{m['cpu_ms_per_image']:.0f}",
                  f"{m['peak_rss_mb']:.0f}" if "peak_rss_mb" in m else "", note)
    con.print(t)
    sc = r["scaling"]
    small, big = (k for k in sc if isinstance(k, int))
    t = Table(title=f"linear cost: {small} vs {big} small images, tiny model")
    for col in ("images", "pack s", "plan s", "run s", "pipeline span s", "run peak RSS MB", "images/s"):
        t.add_column(col, justify="right")
    for n in (small, big):
        t.add_row(str(n), f"{sc[n]['pack_s']:.2f}", f"{sc[n]['plan_s']:.3f}", f"{sc[n]['run_s']:.2f}",
                  f"{sc[n]['pipeline_span_s']:.2f}",
                  f"{sc[n]['run_peak_rss_mb']:.0f}", f"{sc[n]['images_per_s']:.0f}")
    con.print(t)
    t = Table(title="ratios (targets for this 2-core CPU machine)")
    for col in ("ratio", "value", "target", "met"):
        t.add_column(col, justify="left" if col == "ratio" else "right")
    for k, v in r["verdicts"].items():
        op = "<=" if k in ("scaling_10x_time", "peak_rss_mb_10k") else ">="
        t.add_row(k, f"{v['value']:.3f}" if isinstance(v["value"], float) else str(v["value"]),
                  f"{op} {v['target']}", "yes" if v["met"] else "NO")
    for k in ("pipeline_efficiency_steady", "pipeline_efficiency_cpu", "pipeline_efficiency_bound_cpu",
              "bucket_gain_cpu", "speedup_over_naive_bound", "scaling_10x_pipeline_span"):
        t.add_row(k, f"{r['ratios'][k]:.3f}", "(info)", "")
    con.print(t)
    d = r["d_bulkdet"]
    con.print(f"stage busy share in (d): {d['stage_busy_share']}; threads {d['threads']}; "
              f"plan padding waste {d['plan']['padding_waste']:.3f} vs square {d['plan']['square_padding_waste']:.3f}")


# ------------------------------------------------------------------ main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few images (about a minute)")
    ap.add_argument("--images", type=int, help="images in the size mix (default 240; 24 with --quick)")
    ap.add_argument("--small", type=int, nargs=2, metavar=("N", "TEN_N"),
                    help="the linear-cost pair (default 1000 10000; 200 2000 with --quick)")
    ap.add_argument("--repeat", type=int, help="rounds of every measurement, best kept (default 3; 1 with --quick)")
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data", help="cached inputs")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    n = args.images or (24 if args.quick else 240)
    small = tuple(args.small or ((200, 2000) if args.quick else (1000, 10000)))
    args.repeat = args.repeat or (1 if args.quick else 3)
    data = args.data
    work = data / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.perf_counter()

    r: dict = {"settings": {"images": n, "small": list(small), "imgsz": IMGSZ, "max_batch": MAX_BATCH,
                            "quick": args.quick, "repeat": args.repeat},
               "machine": machine()}
    print(f"bench: preparing model and {n} images under {data} ...", flush=True)
    from benchmarks.yolov8n import ensure_model  # torch: only here (benchmarks.tiling imports this module)

    model = ensure_model(data / "models")
    tiny = build_analytic_detector(data / "models" / "analytic.onnx")
    mix = data / f"mix-{n}"
    images = jpeg_folder(make_jpeg_mix(mix / "generated", n), mix / "images")
    r["pack"] = pack(images, mix / "dataset", work)

    from bulkdet.model.info import load_model_info

    info = load_model_info(model)
    good = read_manifest(mix / "dataset")
    settings = {"stride": info.stride, "pixel_budget": default_pixel_budget("cpu", IMGSZ, MAX_BATCH),
                "decode_budget": DEFAULT_DECODE_BUDGET}
    planned = plan(good, IMGSZ, MAX_BATCH, **settings)
    square = plan(good, IMGSZ, MAX_BATCH, **settings, fixed_hw=(IMGSZ, IMGSZ))
    dali_threads, infer_threads, infer_workers = default_threads("cpu")
    r["model"] = {"path": model.name, "infer_threads": infer_threads, "infer_workers": infer_workers,
                  "dali_threads_in_run": dali_threads}

    r["pack_small"] = {}
    small_sets = {}
    for k in small:
        small_sets[k], r["pack_small"][k] = prepare_small(k, data, work)

    steps = [("a_model_planned", lambda: model_only(model, planned, infer_threads, infer_workers)),
             ("b_model_square", lambda: model_only(model, square, infer_threads, infer_workers)),
             ("c_decode", lambda: decode_only(mix / "dataset", planned, usable_cores())),
             ("d_bulkdet", lambda: bulkdet_run(mix / "dataset", model, work / "run-mix", work)),
             ("e_naive", lambda: naive_run(mix / "images", model, work / "naive.parquet", work))]
    steps += [(f"small_{k}", lambda k=k: small_run(k, small_sets[k], work, tiny)) for k in small]
    # Rounds of every measurement, interleaved, so that load from elsewhere hits them alike;
    # each keeps its fastest repetition.
    runs: dict[str, list] = {key: [] for key, _ in steps}
    for i in range(args.repeat):
        for key, step in steps:
            print(f"bench: round {i + 1}/{args.repeat}: {key} ...", flush=True)
            runs[key].append(step())
    r.update({key: best_of(v) for key, v in runs.items()})
    r["scaling"] = scaling(small, r)
    r["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    r["ratios"] = ratios(r)
    r["verdicts"] = verdicts(r["ratios"])
    r["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    print_tables(r)

    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.results / f"bench-{platform.node()}-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(r, indent=1, default=str) + "\n")
    print(f"bench: {r['bench_wall_s']} s; results in {path}")
    return r


if __name__ == "__main__":
    main()
