"""`make gpu-check`: the GPU path checked and measured in one command (docs/gpu-and-precision.md).

    python -m benchmarks.gpu_check [--budget-s 300] [--cpu] [--model yolov8n|analytic]
                                   [--data DIR] [--results DIR]

Where bulkdet's GPU path is usable (a GPU the driver lists, DALI's CUDA build, cuda-python,
ONNX Runtime's CUDA provider) it:

  a. imports every package the check needs and names those missing (the rest still runs);
  b. runs `pytest -m gpu` on the files holding gpu-marked tests, in a child process, while it
     generates the data (the GPU measurements wait for it);
  c. measures on data it generates: decode only (DALI "mixed", hw_decoder_load 0, 0.65 and 0.9,
     1080p and small JPEGs), model only (ONNX Runtime CUDA at the batches bulkdet plans, FP32 and
     FP16), end to end (bulkdet's runner: FP32, FP32 with NMS in the model, FP16 with NMS in the
     model), the naive script on the GPU (PIL + ONNX Runtime CUDA at batch 1), CPU-vs-GPU
     parity of boxes on the analytic detector, and sliced inference (`--tile 640`) on 4000x3000
     JPEGs: the analytic detector's seam and corner boxes on CPU and GPU, the model's tiles/s;
  d. writes gpu-check-<host>-<time>.json to $OUT when set, else to benchmarks/results/ (again
     after every section, so a killed check keeps what it measured), and prints a table.

Without a usable GPU path (or with --cpu) the same sections run on the CPU on a small data set:
a dry run that proves the script end to end; the GPU figures are null and `gpu_measured` false.

Every section has a time limit and its own try/except: a failure costs only its own figures,
and the JSON records it under `errors`. Throughputs are steady rates: start-up (imports, model
load, cuDNN's algorithm search at the first batches) is reported apart, not averaged in.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMGSZ, MAX_BATCH = 640, 32  # bulkdet's defaults
HW_DECODER_LOADS = (0.0, 0.65, 0.9)
MODEL_BATCHES_PER_PASS = 40  # share of JPEGs for the hardware decoder (A100/H100/H200 have one)
_REEXEC = "BULKDET_GPU_CHECK_LIBS"

# (module, distribution that provides it, what the check needs it for)
PACKAGES = [
    ("numpy", "numpy", "everything"),
    ("pyarrow", "pyarrow", "manifest, output parts"),
    ("typer", "typer", "the CLI"),
    ("rich", "rich", "tables"),
    ("tqdm", "tqdm", "pack's progress bar"),
    ("PIL", "pillow", "data generation, naive script"),
    ("onnx", "onnx", "models"),
    ("lmdb", "lmdb", "shards"),
    ("nvidia.dali", "nvidia-dali-cuda130", "decoding"),
    ("nvidia.nvimgcodec", "nvidia-nvimgcodec-cu13", "decoding (header check)"),
    ("onnxruntime", "onnxruntime-gpu", "inference"),
    ("cuda.bindings", "cuda-bindings", "GPU input buffers"),
    ("pynvml", "nvidia-ml-py", "finding the GPU (NVML)"),
    ("onnxconverter_common", "onnxconverter-common", "FP16 models"),
    ("torch", "torch", "exporting the YOLOv8n benchmark model"),
    ("pytest", "pytest", "the GPU tests"),
]


@dataclass(frozen=True)
class Sizes:
    """How much data and time each measurement gets: sized for ~4 minutes on an H200, or a
    quick CPU dry run."""

    mix: int  # photo-like JPEGs with the real-world size mix (model only, end to end, naive)
    copies: int  # each mix image packed this many times (hard links): a long end-to-end run
    hd: int  # 1920x1080 JPEGs (decode only)
    small: int  # 64x48 JPEGs (decode only)
    demo: int  # analytic-detector images with known boxes (parity)
    tiled: int  # 4000x3000 JPEGs with 4 px squares at tile seams (--tile 640: 48 tiles each), packed
    # once for parity and `copies` times for tiles/s
    measure_s: float  # least seconds per timed measurement (whole passes over its batches)
    e2e_cap_s: float  # an end-to-end run stops after this long; its rate is of what it did
    naive_cap_s: float


GPU_SIZES = Sizes(mix=480, copies=20, hd=256, small=1024, demo=48, tiled=8, measure_s=3.0, e2e_cap_s=15.0, naive_cap_s=10.0)
CPU_SIZES = Sizes(mix=8, copies=1, hd=4, small=32, demo=12, tiled=1, measure_s=0.2, e2e_cap_s=60.0, naive_cap_s=5.0)

# Longest each section may take (seconds); all of them together stay within --budget-s.
LIMITS = {"prepare": 150, "parity": 45, "tiles": 60, "decode": 10, "fp16": 60, "model": 40, "e2e": 35, "naive": 25}
PYTEST_LIMIT_S = 150


# ------------------------------------------------------------------------------ time limits

class TimeLimit(Exception):
    """Raised in the main thread when a time limit set by `time_limit` runs out."""


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeLimit in the main thread after `seconds` (SIGALRM). Nests: an inner limit never
    outlasts an outer one, and the outer one resumes afterwards. A call blocked in C (a CUDA
    kernel) is interrupted when it returns to Python; bulkdet's runner stops its stages cleanly."""
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.getsignal(signal.SIGALRM)
    token = object()

    def expire(signum, frame):
        raise TimeLimit(what, token)

    start = time.monotonic()
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield token
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:  # the outer limit goes on (and fires at once if it ran out meanwhile)
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def _is_mine(exc: TimeLimit, token) -> bool:
    return exc.args[1] is token


# ------------------------------------------------------------------------------ environment

def cuda_library_dirs() -> list[str]:
    """Folders where pip's NVIDIA wheels (on the GPU machine: PyTorch's) hold the CUDA runtime,
    cuBLAS and cuDNN, which onnxruntime-gpu's CUDA provider loads by name."""
    dirs = []
    for entry in sys.path:
        for lib in sorted(Path(entry or ".").glob("nvidia/*/lib")):
            if any(next(lib.glob(f"{name}.so*"), None) for name in ("libcudnn", "libcublas", "libcudart")):
                dirs.append(str(lib.resolve()))
    return list(dict.fromkeys(dirs))


def onnxruntime_cuda() -> dict:
    """Whether ONNX Runtime lists its CUDA provider and can start a session on it, asked in a fresh
    process (this one may have loaded CUDA libraries already, e.g. with torch)."""
    code = ("import json; from bulkdet.system.info import probe_onnxruntime; p = probe_onnxruntime(1); "
            "print(json.dumps({'listed': 'CUDAExecutionProvider' in p.providers, "
            "'problem': p.unavailable.get('CUDAExecutionProvider') or p.error}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime missing: the packages check names it
        return {"listed": False, "problem": f"{type(exc).__name__}: {exc}"}


def with_cuda_library_path(argv: list[str]) -> dict:
    """Where ONNX Runtime lists its CUDA provider but the provider does not find CUDA / cuDNN by
    itself, while pip's NVIDIA wheels hold them, re-execute this check with them on
    LD_LIBRARY_PATH (the loader reads it only when a process starts), so that the tests' and the
    runs' processes find them too. Returns what was found (in the JSON: the docs need to know)."""
    if os.environ.get(_REEXEC):
        return json.loads(os.environ[_REEXEC])
    found = {"onnxruntime_cuda_by_itself": onnxruntime_cuda(), "ld_library_path_added": []}
    libs = cuda_library_dirs()
    if found["onnxruntime_cuda_by_itself"]["listed"] and found["onnxruntime_cuda_by_itself"]["problem"] and libs:
        found["ld_library_path_added"] = libs
        current = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join(libs + current), _REEXEC: json.dumps(found)}
        print(f"gpu-check: ONNX Runtime's CUDA provider did not start by itself "
              f"({found['onnxruntime_cuda_by_itself']['problem']}); running again with "
              f"LD_LIBRARY_PATH={':'.join(libs)}", flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *argv], env)
    return found


def packages() -> dict:
    """Each package the check needs: version and folder, or why it does not import."""
    found = {}
    for module, dist, purpose in PACKAGES:
        entry = {"distribution": dist, "needed_for": purpose}
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - an unloadable package is reported, not raised
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            entry["version"] = getattr(mod, "__version__", None) or _dist_version(dist)
            entry["path"] = str(Path(mod.__file__).parent) if getattr(mod, "__file__", None) else None
            if module == "onnxruntime":
                entry["providers"] = mod.get_available_providers()
        found[module] = entry
    return found


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_path() -> dict:
    """Whether bulkdet's GPU path with ONNX Runtime is usable here, and what is missing if not."""
    from bulkdet.system.devices import probe
    from bulkdet.system.info import probe_gpus

    status = probe()
    return {"usable": status.backend_ok("onnxruntime"), "gpu_name": status.gpu_name,
            "compute_capability": status.compute_capability, "missing": status.problems("onnxruntime"),
            "nvml": asdict(probe_gpus())}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": platform.node(), "cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


# ------------------------------------------------------------------------------ (b) GPU tests

def gpu_test_files() -> list[str]:
    """The test files holding gpu-marked tests. Only these are collected: the other test files
    import packages the GPU machine lacks (duckdb, ray), which would stop collection."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def start_gpu_tests(work: Path) -> tuple[subprocess.Popen, Path, Path]:
    xml, log = work / "pytest-gpu.xml", work / "pytest-gpu.log"
    xml.unlink(missing_ok=True)  # an earlier run's report must not pass for this one's
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *gpu_test_files()]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return proc, xml, log


def finish_gpu_tests(proc: subprocess.Popen, xml: Path, log: Path, timeout_s: float) -> dict:
    try:
        rc = proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"pytest -m gpu still running after its {timeout_s:.0f} s; log:\n"
                           + log.read_text()[-1500:])
    result = {"exit_code": rc, "files": gpu_test_files(), "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
              "failures": [], "skips": []}
    if not xml.exists():
        raise RuntimeError(f"pytest -m gpu exited {rc} without a report; log:\n{log.read_text()[-1500:]}")
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("skipped", "failure", "error")), None)
        if outcome is None:
            result["passed"] += 1
        elif outcome.tag == "skipped":
            result["skipped"] += 1
            result["skips"].append(f"{name}: {outcome.get('message', '')}"[:300])
        else:
            result["failed" if outcome.tag == "failure" else "errors"] += 1
            result["failures"].append(f"{name}: {(outcome.get('message') or outcome.text or '')[:600]}")
    if rc != 0:  # only the JSON comes back from the GPU machine: keep the end of pytest's log in it
        result["log_tail"] = log.read_text()[-4000:]
    return result


# ------------------------------------------------------------------------------ data and models

def prepare(data: Path, sizes: Sizes, model_choice: str, workers: int) -> dict:
    """Generate the images, pack them, build the models. Reuses what an earlier run made."""
    from benchmarks.dataset import jpeg_folder, make_jpeg_mix, make_photos, make_small_images
    from benchmarks.tiling import make_images as make_tile_images
    from bulkdet.synthetic import build_analytic_detector, make_demo_images
    from bulkdet.ingest.pack import pack

    t0 = time.perf_counter()
    mix = make_jpeg_mix(data / "generated" / "mix", sizes.mix, workers=workers)
    folders = {
        "mix": jpeg_folder(mix, data / "mix" / "images", copies=sizes.copies),
        "1080p": jpeg_folder(make_photos(data / "generated" / "1080p", sizes.hd, (1920, 1080), workers=workers),
                             data / "1080p" / "images"),
        "small": jpeg_folder(make_small_images(data / "generated" / "small", sizes.small), data / "small" / "images"),
    }
    folders["demo"] = data / "demo" / "images"
    truth = make_demo_images(folders["demo"], n=sizes.demo, truth_path=data / "demo" / "truth.json")
    folders["tiles"] = data / "tiles" / "images"
    tile_truth = make_tile_images(folders["tiles"], sizes.tiled)
    folders["tiles_many"] = jpeg_folder(sorted(folders["tiles"].glob("*.jpg")), data / "tiles_many" / "images",
                                        copies=sizes.copies)
    generate_s = time.perf_counter() - t0
    datasets = {}
    for name, folder in folders.items():
        datasets[name] = data / name / "dataset"
        pack(folder, datasets[name], threads=workers, quiet=True)
    pack_s = time.perf_counter() - t0 - generate_s
    analytic = build_analytic_detector(data / "models" / "analytic.onnx")
    models = {"analytic": analytic, "name": "analytic detector", "fp32": analytic, "fallback": None}
    if model_choice == "yolov8n":
        try:
            from benchmarks.yolov8n import ensure_model  # needs torch (its CPU build is enough)

            models.update(fp32=ensure_model(data / "models"), name="YOLOv8n architecture, random weights")
        except ImportError as exc:  # e.g. a venv made without the bench extra: still a dry run
            models["fallback"] = f"no YOLOv8n ({exc}): the benchmark model is the analytic detector"
    return {"datasets": datasets, "mix_images": mix, "truth": truth, "tile_truth": tile_truth, "models": models,
            "generate_s": round(generate_s, 2), "pack_s": round(pack_s, 2),
            "model_s": round(time.perf_counter() - t0 - generate_s - pack_s, 2),
            "images": {"mix_unique": sizes.mix, "mix_rows": sizes.mix * sizes.copies, "1080p": sizes.hd,
                       "small_64x48": sizes.small, "demo": sizes.demo, "tiled_4000x3000": sizes.tiled,
                       "tiled_rows": sizes.tiled * sizes.copies}}


def fp16_model(fp32: Path, cache: Path) -> Path:
    from bulkdet.model.precision import prepare_model

    return prepare_model(fp32, "fp16", cache=cache).path


def _planned(dataset: Path, device: str, model_path: Path | None = None):
    """The batches `bulkdet run` makes of this dataset on this device (same planner, same budgets)."""
    from bulkdet.model.info import load_model_info
    from bulkdet.run.plan import DEFAULT_DECODE_BUDGET, default_pixel_budget, plan
    from bulkdet.store.manifest import read_manifest

    stride, fixed, max_batch = 32, None, MAX_BATCH
    if model_path is not None:
        info = load_model_info(model_path)
        stride, fixed, max_batch = info.stride, info.fixed_shape, info.batch or MAX_BATCH
    side = fixed[0] if fixed else -(-IMGSZ // stride) * stride
    return plan(read_manifest(dataset), IMGSZ, max_batch, stride=stride, fixed_hw=fixed,
                pixel_budget=default_pixel_budget(device, side, max_batch), decode_budget=DEFAULT_DECODE_BUDGET)


def timed_passes(step, items: list, measure_s: float, finish=None) -> tuple[int, float, int]:
    """Whole passes of step(item) over items until measure_s has passed, then finish() (waiting
    for queued GPU work) inside the timing: (images, seconds, passes)."""
    n = passes = 0
    t0 = time.perf_counter()
    while not passes or time.perf_counter() - t0 < measure_s:
        for item in items:
            n += step(item)
        passes += 1
    if finish:
        finish()
    return n, time.perf_counter() - t0, passes


def _rate(n: int, wall: float, **extra) -> dict:
    return {"images": n, "wall_s": round(wall, 3), "images_per_s": round(n / wall, 2) if wall > 0 else None, **extra}


# ------------------------------------------------------------------------------ (c) measurements

def decode_only(dataset: Path, device: str, load: float | None, measure_s: float, threads: int) -> dict:
    """DALI decode + letterbox of the planned batches, encoded bytes already in memory."""
    from bulkdet.run.decode import Decoder
    from bulkdet.store.shards import ShardReader

    the_plan = _planned(dataset, device)
    batches = list(the_plan)
    reader = ShardReader(dataset / "shards")
    encoded = [reader.get_many(b.shard, b.keys) for b in batches]
    reader.close()
    megapixels = sum(int((b.width.astype("int64") * b.height).sum()) for b in batches) / 1e6
    decoder = Decoder(device, int(the_plan.batch_sizes().max()), threads, hw_decoder_load=load)
    last = decoder.decode(batches[0], encoded[0])  # warm-up: builds the graph, allocates

    def step(i):
        nonlocal last
        last = decoder.decode(batches[i], encoded[i])
        return len(batches[i])

    def finish():  # DALI's GPU work may still be queued: the timing ends when the device is idle
        if device == "gpu":
            from cuda.bindings import runtime as cudart

            from bulkdet.engines.cuda import check

            check(cudart.cudaDeviceSynchronize())

    n, wall, passes = timed_passes(step, list(range(len(batches))), measure_s, finish)
    return _rate(n, wall, passes=passes, batches=len(batches), threads=threads,
                 original_megapixels_per_s=round(megapixels * passes / wall, 1))


def model_only(model: Path, dataset: Path, device: str, measure_s: float) -> dict:
    """The engine bulkdet builds, used as the runner uses it, on inputs already in its input
    memory (on the GPU: staged once in device buffers), at the plan's batch shapes in plan order;
    outputs come back to the host, as in a run."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from bulkdet.engines import create_engine
    from bulkdet.run.runner import default_threads

    the_plan = _planned(dataset, device, model)
    shapes = [(b, h, w) for b, (h, w) in zip(the_plan.batch_sizes().tolist(), the_plan.input_hw.tolist())]
    # Every k-th batch: the plan's mix of shapes in proportion, a pass short enough to repeat.
    shapes = shapes[::max(1, len(shapes) // MODEL_BATCHES_PER_PASS)]
    images = sum(b for b, _, _ in shapes)
    distinct = sorted(set(shapes))
    _, infer_threads, workers = default_threads(device)
    t0 = time.perf_counter()
    engine = create_engine("onnxruntime", model, device=device, threads=infer_threads, shapes=distinct,
                           ring_slots=len(distinct))
    try:
        rng = np.random.default_rng(0)
        inputs = {s: engine.stage(rng.random((s[0], 3, s[1], s[2]), dtype=np.float32).astype(engine.input_dtype))
                  for s in distinct}
        for s in distinct:  # warm-up: the first run at a shape plans memory (and searches cuDNN algorithms)
            engine.infer(inputs[s])
        warmup_s = time.perf_counter() - t0
        with ThreadPoolExecutor(workers) as pool:
            def one_pass(_):
                list(pool.map(lambda s: engine.infer(inputs[s]), shapes))
                return images

            n, wall, passes = timed_passes(one_pass, [None], measure_s)
        provider, dtype = engine.provider, np.dtype(engine.input_dtype).name
        for slot in inputs.values():
            engine.release(slot)
    finally:
        engine.close()
    return _rate(n, wall, passes=passes, batches=len(shapes), distinct_shapes=len(distinct), workers=workers,
                 provider=provider, input_dtype=dtype, startup_s=round(warmup_s, 2),
                 input_megapixels_per_s=round(sum(b * h * w for b, h, w in shapes) * passes / wall / 1e6, 1))


def end_to_end(dataset: Path, model: Path, out: Path, device: str, cap_s: float, cache: Path,
               precision: str = "fp32", nms_in_model: bool = False, tile: int = 0) -> dict:
    """bulkdet's runner (what `bulkdet run` calls), stopped after cap_s like a Ctrl-C: the steady
    rate is of the batches done, from the run's own metrics (first batch out to last)."""
    from bulkdet.results.report import summarize
    from bulkdet.run.runner import RunConfig, run
    from bulkdet.run.tiles import TileSettings

    shutil.rmtree(out, ignore_errors=True)
    cfg = RunConfig(dataset=dataset, model=model, out=out, device=device, backend="onnxruntime",
                    precision=precision, nms_in_model=nms_in_model, quiet=True, cache_dir=cache,
                    tiles=TileSettings(tile, full=False))
    complete = True
    t0 = time.perf_counter()
    try:
        with time_limit(cap_s, f"end to end run capped at {cap_s:.0f} s") as token:
            run(cfg)
    except TimeLimit as exc:
        if not _is_mine(exc, token):
            raise
        complete = False
    wall = time.perf_counter() - t0
    s = summarize(out)
    run_json = json.loads((out / "run.json").read_text())
    return {"images": s.get("processed", 0), "images_per_s": round(s["images_per_s"], 2) if "images_per_s" in s else None,
            "wall_s": round(wall, 2), "wall_images_per_s": round(s.get("processed", 0) / wall, 2),
            "startup_and_warmup_s": round(wall - s.get("steady_s", 0.0), 2), "complete": complete,
            "device": run_json.get("device") or device, "provider": run_json.get("provider"),
            "bottleneck": s.get("bottleneck"),
            "stage_busy_share": {k: round(v, 3) for k, v in (s.get("stage_busy_share") or {}).items()},
            "detections": s.get("detections"), "failed": s.get("failed"),
            "threads": run_json.get("threads"), "mean_batch": (run_json.get("plan") or {}).get("mean_batch"),
            **({"tiles_per_s": round(s["tiles_per_s"], 1)} if s.get("tiles_per_s") else {}),
            **first_calls(out)}


def first_calls(run_dir: Path) -> dict:
    """Inference seconds of each batch shape's first call (ONNX Runtime plans memory and cuDNN
    searches its algorithms then), against all inference seconds: what of a short run's rate
    is start-up that a long run would not see."""
    import numpy as np

    from bulkdet.results.report import timeline
    from bulkdet.store.parts import read_metrics

    metrics = read_metrics(run_dir)
    if metrics is None or not len(metrics):
        return {}
    t = timeline(metrics)
    order = np.argsort(t["infer_start"])
    seen, first = set(), 0.0
    for i in order:
        shape = (int(t["batch_size"][i]), int(t["input_h"][i]), int(t["input_w"][i]))
        if shape not in seen:
            seen.add(shape)
            first += float(t["infer_s"][i])
    return {"batch_shapes": len(seen), "infer_first_call_per_shape_s": round(first, 2),
            "infer_s": round(float(np.nansum(t["infer_s"])), 2)}


def naive(images: list[Path], model: Path, device: str, cap_s: float) -> dict:
    """benchmarks/naive.py's per-image loop (PIL, square letterbox, batch 1, numpy NMS) on the same
    device; steady rate after its first image, like bulkdet's."""
    from benchmarks.naive import detect, open_session

    t0 = time.perf_counter()
    session = open_session(str(model), device)
    detect(session, images[0])  # warm-up, as bulkdet's first batch is left out of its rate
    startup = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for path in images[1:]:
        detect(session, path)
        n += 1
        if time.perf_counter() - t1 >= cap_s:
            break
    return _rate(n, time.perf_counter() - t1, provider=session.get_providers()[0], startup_s=round(startup, 2))


def parity(dataset: Path, truth: list[dict], analytic: Path, runs: Path, gpu: bool, cache: Path) -> dict:
    """The analytic detector over images with known boxes: on the CPU, and on the GPU when there is
    one; every box where the truth says, and the GPU's boxes within 1 px of the CPU's."""
    import numpy as np

    from bulkdet.synthetic import compare_with_truth
    from bulkdet.run.runner import RunConfig, run
    from bulkdet.store.parts import read_detections

    boxes, result = {}, {"images": len(truth)}
    for device in ("cpu", "gpu") if gpu else ("cpu",):
        out = runs / f"parity-{device}"
        shutil.rmtree(out, ignore_errors=True)
        run(RunConfig(dataset=dataset, model=analytic, out=out, device=device, backend="onnxruntime",
                      quiet=True, cache_dir=cache))
        rows = read_detections(out).to_pylist()
        boxes[device] = {(r["path"], r["class_id"]): np.array([r["x1"], r["y1"], r["x2"], r["y2"]]) for r in rows}
        problems = compare_with_truth(truth, rows)
        result[f"{device}_boxes"] = len(rows)
        result[f"{device}_truth_problems"] = problems[:10]
    if gpu:
        cpu_b, gpu_b = boxes["cpu"], boxes["gpu"]
        result["same_objects"] = cpu_b.keys() == gpu_b.keys()
        common = cpu_b.keys() & gpu_b.keys()
        result["max_box_diff_px"] = round(max((float(np.abs(cpu_b[k] - gpu_b[k]).max()) for k in common),
                                              default=0.0), 3)
    result["passed"] = (not result["cpu_truth_problems"] and
                        (not gpu or (result["same_objects"] and result["max_box_diff_px"] <= 1.0
                                     and not result["gpu_truth_problems"])))
    return result


def tiled_parity(dataset: Path, truth: list[dict], analytic: Path, runs: Path, gpu: bool, cache: Path) -> dict:
    """`--tile 640 --no-tile-full` with the analytic detector on 4000x3000 JPEGs whose 4 px squares
    sit anywhere, on a tile seam and at a tile corner: on the CPU, and on the GPU (DALI's region
    decode and slicing there) when there is one; every square found within 3 px, no duplicate,
    and the GPU's boxes within 1 px of the CPU's."""
    import numpy as np

    from benchmarks.tiling import TILE, recall
    from bulkdet.run.runner import RunConfig, run
    from bulkdet.run.tiles import TileSettings
    from bulkdet.store.parts import read_detections

    boxes, result = {}, {"images": len(truth)}
    for device in ("cpu", "gpu") if gpu else ("cpu",):
        out = runs / f"tiles-{device}"
        shutil.rmtree(out, ignore_errors=True)
        run(RunConfig(dataset=dataset, model=analytic, out=out, device=device, backend="onnxruntime",
                      quiet=True, cache_dir=cache, tiles=TileSettings(TILE, full=False)))
        rows = read_detections(out).to_pylist()
        boxes[device] = {(r["path"], r["class_id"]): np.array([r["x1"], r["y1"], r["x2"], r["y2"]]) for r in rows}
        result[device] = recall(truth, rows)
    if gpu:
        common = boxes["cpu"].keys() & boxes["gpu"].keys()
        result["same_objects"] = boxes["cpu"].keys() == boxes["gpu"].keys()
        result["max_box_diff_px"] = round(max((float(np.abs(boxes["cpu"][k] - boxes["gpu"][k]).max())
                                               for k in common), default=0.0), 3)
    result["passed"] = all(result[d]["recall"] == 1.0 and not result[d]["duplicates"] for d in boxes) and (
        not gpu or (result["same_objects"] and result["max_box_diff_px"] <= 1.0))
    return result


# ------------------------------------------------------------------------------ (d) the check

HEADLINE = ("decode_only_images_per_s", "model_only_images_per_s", "e2e_images_per_s", "efficiency",
            "speedup_vs_naive")


class Check:
    """Runs sections one by one, each within its time limit and the whole budget, and saves the
    JSON after each, so that one failure (or a kill) costs only what had not been measured."""

    def __init__(self, result: dict, path: Path, budget_s: float):
        self.result = result
        self.path = path
        self.deadline = time.monotonic() + budget_s

    def section(self, keys: tuple[str, ...], fn, limit_s: float):
        name = ".".join(keys)
        left = self.deadline - time.monotonic()
        value = None
        t0 = time.perf_counter()
        if left < 3:
            self.result["errors"][name] = "skipped: the check's --budget-s was spent"
        else:
            print(f"gpu-check: {name} ...", flush=True)
            try:
                with time_limit(min(limit_s, left), f"{name} over its {min(limit_s, left):.0f} s limit"):
                    value = fn()
            except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
                tail = "".join(traceback.format_exception(exc)[-3:])
                self.result["errors"][name] = f"{type(exc).__name__}: {exc}"[:800] + "\n" + tail[-1200:]
                print(f"gpu-check: {name} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            else:
                node = self.result
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = value
                if isinstance(value, dict) and value.get("passed") is False:
                    self.result["errors"][name] = "check failed: " + json.dumps(value, default=str)[:800]
        self.result["section_s"][name] = round(time.perf_counter() - t0, 2)
        self.save()
        gc.collect()  # the section's sessions and DALI pipelines give their GPU memory back now
        return value

    def save(self) -> None:
        """Temporary file and rename, with the standard library only: the JSON must be written
        even where the packages it reports missing (pyarrow, for bulkdet's own writer) are."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def _get(result: dict, *keys):
    for k in keys:
        if not isinstance(result, dict) or result.get(k) is None:
            return None
        result = result[k]
    return result


def headline(result: dict) -> dict:
    """The five figures: best decode rate on 1080p JPEGs, FP32 model only at the planned batches,
    FP32 end to end (the default `bulkdet run`), and their ratios."""
    decode = max((v["images_per_s"] for v in (_get(result, "decode_only", "1080p") or {}).values()
                  if v.get("images_per_s")), default=None)
    model = _get(result, "model_only", "fp32", "images_per_s")
    e2e = _get(result, "end_to_end", "fp32", "images_per_s")
    naive_rate = _get(result, "naive", "images_per_s")
    return {"decode_only_images_per_s": decode, "model_only_images_per_s": model, "e2e_images_per_s": e2e,
            "efficiency": round(e2e / model, 3) if e2e and model else None,
            "speedup_vs_naive": round(e2e / naive_rate, 2) if e2e and naive_rate else None}


def describe_device(gpu: dict, cpu: str) -> str:
    if gpu.get("usable"):
        nvml = gpu.get("nvml") or {}
        first = (nvml.get("gpus") or [{}])[0]
        return (f"{gpu['gpu_name']} ({first.get('memory_total_gib')} GiB, compute capability "
                f"{first.get('compute_capability')}; driver {nvml.get('driver')}, CUDA {nvml.get('cuda_driver')})")
    return f"cpu: {cpu}"


def run_check(args, result: dict, path: Path) -> dict:
    gpu = result["gpu_measured"]
    device = "gpu" if gpu else "cpu"
    sizes = Sizes(**result["sizes_used"])
    data = args.data
    cache, runs = data / "cache", data / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    threads = result["machine"]["usable_cores"]
    check = Check(result, path, args.budget_s)
    check.save()

    t_tests = time.monotonic()
    tests = None
    if args.skip_tests:
        result["notes"]["pytest_gpu"] = "not run (--skip-tests)"
    else:
        try:
            tests = start_gpu_tests(data)
        except Exception as exc:  # noqa: BLE001
            result["errors"]["pytest_gpu"] = f"{type(exc).__name__}: {exc}"
    prep = check.section(("data",), lambda: prepare(data, sizes, args.model, threads), LIMITS["prepare"])
    if tests:  # the GPU measurements must not share the GPU with the tests
        check.section(("pytest_gpu",),
                      lambda: finish_gpu_tests(*tests, PYTEST_LIMIT_S - (time.monotonic() - t_tests)),
                      PYTEST_LIMIT_S)
        if tests[0].poll() is None:  # still running: over its limit or the budget
            tests[0].kill()
            tests[0].wait()
        pytest_result = result.get("pytest_gpu") or {}
        if pytest_result.get("failed") or pytest_result.get("errors"):
            result["errors"]["pytest_gpu"] = f"{pytest_result['failed']} failed, {pytest_result['errors']} errors"
    if prep is None:
        return result
    # Only the figures of `prep` stay in the JSON; its paths and truth are used below.
    ds, models = prep["datasets"], prep["models"]
    result["data"] = {k: v for k, v in prep.items() if k in ("generate_s", "pack_s", "model_s", "images")}
    result["model"] = {"name": models["name"], "file": models["fp32"].name}
    if models["fallback"]:  # on a GPU the figures would not be YOLOv8n's: an error there, a note here
        result["errors" if gpu else "notes"]["model"] = models["fallback"]

    check.section(("parity",), lambda: parity(ds["demo"], prep["truth"], models["analytic"], runs, gpu, cache),
                  LIMITS["parity"])
    check.section(("tiles", "parity"),
                  lambda: tiled_parity(ds["tiles"], prep["tile_truth"], models["analytic"], runs, gpu, cache),
                  LIMITS["tiles"])
    for name in ("1080p", "small"):
        for load in HW_DECODER_LOADS if gpu else (None,):
            key = "cpu" if load is None else f"hw_decoder_load={load}"
            check.section(("decode_only", name, key),
                          lambda: decode_only(ds[name], device, load, sizes.measure_s, threads),
                          LIMITS["decode"] + sizes.measure_s)
    fp16 = check.section(("model", "fp16_file"), lambda: str(fp16_model(models["fp32"], cache)), LIMITS["fp16"])
    for precision, file in (("fp32", models["fp32"]), ("fp16", fp16 and Path(fp16))):
        if file is None:
            continue
        check.section(("model_only", precision), lambda: model_only(file, ds["mix"], device, sizes.measure_s),
                      LIMITS["model"])

    def e2e(key, precision, nms):
        check.section(("end_to_end", key),
                      lambda: end_to_end(ds["mix"], models["fp32"], runs / f"e2e-{key}", device, sizes.e2e_cap_s,
                                         cache, precision, nms),
                      LIMITS["e2e"] + sizes.e2e_cap_s)

    e2e("fp32", "fp32", False)  # the default run, and the naive script next: the headline figures first
    check.section(("naive",), lambda: naive(sorted(prep["mix_images"]), models["fp32"], device, sizes.naive_cap_s),
                  LIMITS["naive"])
    e2e("fp32_nms_in_model", "fp32", True)
    e2e("fp16_nms_in_model", "fp16", True)
    check.section(("tiles", "fp32"),  # the images are counted whole; tiles_per_s is the figure here
                  lambda: end_to_end(ds["tiles_many"], models["fp32"], runs / "e2e-tiles", device, sizes.e2e_cap_s,
                                     cache, tile=640),
                  LIMITS["e2e"] + sizes.e2e_cap_s)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    gpu = result["gpu_measured"]
    t = Table(title=f"gpu-check on {result['device']}", title_justify="left")
    for col in ("measurement", "images/s", "notes"):
        t.add_column(col, justify="right" if col == "images/s" else "left")

    def row(label, m, note=""):
        if m:
            t.add_row(label, f"{m['images_per_s']:.1f}" if m.get("images_per_s") else "-", note)

    for name, loads in (result.get("decode_only") or {}).items():
        for key, m in loads.items():
            row(f"decode only, {name}, {key}", m, f"{m['original_megapixels_per_s']} MP/s, {m['threads']} threads")
    for precision, m in (result.get("model_only") or {}).items():
        row(f"model only, {precision}", m, f"{m['provider']}, {m['batches']} batches/pass, "
                                           f"{m['input_megapixels_per_s']} input MP/s, start-up {m['startup_s']} s")
    for key, m in (result.get("end_to_end") or {}).items():
        row(f"end to end, {key}", m, f"{m['images']} images{'' if m['complete'] else ' (capped)'}, "
                                     f"bottleneck {m['bottleneck']}, start-up {m['startup_and_warmup_s']} s")
    row("naive script (PIL, batch 1)", result.get("naive"), (result.get("naive") or {}).get("provider", ""))
    con.print(t)
    figures = result["headline"] if gpu else result["cpu_dry_run"]
    t = Table(title="headline" + ("" if gpu else ": CPU dry run, NOT GPU figures"), title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in HEADLINE:
        t.add_row(k, "-" if figures.get(k) is None else str(figures[k]))
    con.print(t)
    p = result.get("parity") or {}
    if p:
        con.print(f"parity on {p['images']} analytic-detector images: "
                  + ("[green]passed[/green]" if p["passed"] else "[red]FAILED[/red]")
                  + (f", CPU vs GPU max box difference {p['max_box_diff_px']} px" if "max_box_diff_px" in p else ""))
    tiles = result.get("tiles") or {}
    if tiles.get("parity"):
        tp = tiles["parity"]
        con.print(f"--tile 640 on {tp['images']} 4000x3000 images (squares at seams and a corner): "
                  + ("[green]passed[/green]" if tp["passed"] else "[red]FAILED[/red]")
                  + (f", CPU vs GPU max box difference {tp['max_box_diff_px']} px" if "max_box_diff_px" in tp else ""))
    if tiles.get("fp32"):
        con.print(f"--tile 640, model fp32: {tiles['fp32'].get('tiles_per_s')} tiles/s "
                  f"(bottleneck {tiles['fp32'].get('bottleneck')})")
    tests = result.get("pytest_gpu")
    if tests:
        con.print(f"pytest -m gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped")
    if result["missing_packages"]:
        con.print(f"[red]missing packages:[/red] {escape(', '.join(result['missing_packages']))}")
    for name, note in result["notes"].items():
        con.print(f"note on {name}: {escape(note)}", highlight=False)
    for name, err in result["errors"].items():
        con.print(f"[red]error[/red] in {name}: {escape(err.splitlines()[0][:300])}", highlight=False)
    if not gpu:
        con.print("[bold yellow]The GPU figures were NOT measured[/bold yellow] (no usable GPU path: "
                  + escape("; ".join(result["gpu_path"].get("missing") or [])) + "). "
                  "This was a CPU dry run on a small data set.")
    con.print(f"results: {result['json']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=300,
                    help="the whole check's seconds, data and tests included (default 300; sized for ~4 min)")
    ap.add_argument("--cpu", action="store_true", help="the CPU dry run even where a GPU is usable")
    ap.add_argument("--model", choices=("yolov8n", "analytic"), default="yolov8n",
                    help="benchmark model: random-weight YOLOv8n (exported with torch) or the analytic detector")
    ap.add_argument("--data", type=Path, help="generated data (default benchmarks/data/gpu-check-gpu|cpu)")
    ap.add_argument("--results", type=Path, help="where the JSON goes (default $OUT, else benchmarks/results)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = ap.parse_args(argv)

    libs = with_cuda_library_path(argv)
    t0 = time.perf_counter()
    found = packages()
    missing = [f"{m} (pip: {e['distribution']}, for {e['needed_for']})" for m, e in found.items() if "error" in e]
    if "CUDAExecutionProvider" not in found["onnxruntime"].get("providers", ["CUDAExecutionProvider"]):
        missing.append("onnxruntime's CUDAExecutionProvider (pip: onnxruntime-gpu, for inference on the GPU)")
    try:
        gpu = gpu_path()
    except Exception as exc:  # noqa: BLE001 - e.g. a package of the probe missing
        gpu = {"usable": False, "missing": [f"the GPU probe failed: {type(exc).__name__}: {exc}"]}
    measured = bool(gpu["usable"]) and not args.cpu
    if args.cpu:
        gpu = {**gpu, "missing": ["--cpu asked for the CPU dry run"]}
    mach = machine()
    args.data = args.data or ROOT / "benchmarks" / "data" / f"gpu-check-{'gpu' if measured else 'cpu'}"
    results = args.results or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"gpu-check-{mach['host']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {
        "device": describe_device(gpu, mach["cpu"]) if measured else f"cpu: {mach['cpu']}",
        "gpu_measured": measured, **dict.fromkeys(HEADLINE), "cpu_dry_run": None,
        "gpu_path": gpu, "machine": mach, "missing_packages": missing, "packages": found,
        "cuda_libraries": libs, "budget_s": args.budget_s, "sizes_used": asdict(GPU_SIZES if measured else CPU_SIZES),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "json": str(path), "errors": {}, "notes": {},
        "section_s": {},
    }
    if missing:
        print(f"gpu-check: missing packages (the sections that need them will fail): {'; '.join(missing)}")
    if not measured:
        print("gpu-check: no usable GPU path here, so this is a CPU dry run on a small data set: "
              f"the GPU figures will NOT be measured ({'; '.join(gpu.get('missing') or [])})", flush=True)
        if Path("/dev/nvidia0").exists() and not args.cpu:
            print("gpu-check: WARNING: this machine has an NVIDIA device, but bulkdet cannot use it; see the "
                  "missing parts above (nvidia-ml-py, DALI, cuda-bindings and onnxruntime-gpu must all import)",
                  flush=True)
    try:
        run_check(args, result, path)
    finally:
        figures = headline(result)
        if measured:
            result.update(figures, headline=figures)
        else:
            result["cpu_dry_run"] = figures
        result["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        Check(result, path, 0).save()
    try:
        print_table(result)
    except ImportError:  # no rich: the figures as they are in the JSON
        print(json.dumps({k: result[k] for k in ("device", "gpu_measured", *HEADLINE, "cpu_dry_run", "errors")},
                         indent=1, default=str))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
