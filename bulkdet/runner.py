"""`bulkdet run`: wires read -> decode -> infer -> postprocess/write with threads and bounded queues."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from bulkdet import __version__
from bulkdet.atomic import write_json_atomic
from bulkdet.decode import Decoder
from bulkdet.engines import create_engine
from bulkdet.metrics import BatchTimes, MetricsRecorder
from bulkdet.models import load_model_info
from bulkdet.pipeline import Stage, StagePipeline
from bulkdet.plan import DEFAULT_DECODE_BUDGET, Batch, default_pixel_budget, plan
from bulkdet.postprocess import postprocess
from bulkdet.sink import RunSink, prepare_run_dir, read_images
from bulkdet.store.manifest import read_manifest
from bulkdet.store.shards import ShardReader

log = logging.getLogger("bulkdet")


@dataclass
class RunConfig:
    dataset: Path
    model: Path
    out: Path
    device: str = "auto"
    backend: str = "auto"
    imgsz: int = 640
    max_batch: int = 32
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    names: Path | None = None
    precision: str = "fp32"
    overwrite: bool = False
    dali_threads: int | None = None
    infer_threads: int | None = None
    commit_images: int = 4096
    shards: list[int] | None = None  # only these shards (a scale-out worker's share)
    quiet: bool = False
    pixel_budget: int | None = None  # input pixels per batch (None: default_pixel_budget)
    decode_budget: int | None = None  # original pixels decoded at once (None: DEFAULT_DECODE_BUDGET)
    infer_workers: int | None = None  # batches inferred at once (None: default_threads)


@dataclass
class RunSummary:
    images: int
    failed: int
    detections: int
    by_status: dict
    wall_s: float
    processed: int  # images decoded and inferred in this invocation (not resumed ones)
    stage_s: dict = field(default_factory=dict)


class _Work:
    """One batch travelling through the stages; each stage fills in its part."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.encoded = None
        self.decoded = None
        self.outputs = None
        self.detections = None
        self.times = BatchTimes()


def resolve_device(device: str) -> str:
    if device in ("auto", "cpu"):
        return "cpu"
    raise RuntimeError("--device gpu: no usable GPU backend in this build; use --device cpu")


def environment() -> dict:
    import nvidia.dali
    import onnxruntime
    import pyarrow

    return {"bulkdet": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "pyarrow": pyarrow.__version__,
            "dali": nvidia.dali.__version__, "onnxruntime": onnxruntime.__version__}


def run(cfg: RunConfig) -> RunSummary:
    t_start = time.time()
    model = load_model_info(cfg.model, cfg.names)
    device = resolve_device(cfg.device)
    input_hw = model.fixed_shape or (_round_up(cfg.imgsz, model.stride),) * 2
    max_batch = model.batch or cfg.max_batch
    dali_threads, infer_threads, infer_workers = default_threads(device, cfg.dali_threads, cfg.infer_threads,
                                                                 cfg.infer_workers)
    fingerprint = {"model_sha256": model.sha256, "conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det,
                   "imgsz": cfg.imgsz, "precision": cfg.precision, "names": model.names}
    done = prepare_run_dir(cfg.out, fingerprint, cfg.overwrite)
    run_id = uuid.uuid4().hex[:12]
    metadata = {"bulkdet.run_id": run_id, "bulkdet.version": __version__, "model_sha256": model.sha256,
                "conf": cfg.conf, "iou": cfg.iou, "imgsz": cfg.imgsz, "precision": cfg.precision}
    run_json = {"run_id": run_id, "state": "running", "started": t_start,
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                "model": {"path": str(cfg.model), "sha256": model.sha256, "names": model.names,
                          "input_hw": input_hw, "input_dtype": np.dtype(model.input_dtype).name},
                "environment": environment()}
    write_json_atomic(run_json, cfg.out / "run.json")

    manifest = read_manifest(cfg.dataset)
    if done:
        manifest = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), pa_array(done))))
    if cfg.shards is not None:
        manifest = manifest.filter(pc.is_in(manifest.column("shard"), pa_array(cfg.shards).cast("int32")))
    is_ok = pc.equal(manifest.column("status"), "ok")
    bad = manifest.filter(pc.invert(is_ok))
    good = manifest.filter(is_ok)
    batches = plan(good, cfg.imgsz, max_batch, stride=model.stride, fixed_hw=model.fixed_shape,
                   pixel_budget=cfg.pixel_budget or default_pixel_budget(device, input_hw[0], max_batch),
                   decode_budget=cfg.decode_budget or DEFAULT_DECODE_BUDGET)
    run_json.update(plan=batches.stats, threads={"dali": dali_threads, "infer": infer_threads,
                                                 "infer_workers": infer_workers})

    engine = create_engine("onnxruntime", cfg.model, device=device, threads=infer_threads)
    log.info("device=%s backend=%s provider=%s buckets=%s batches=%d threads: dali=%d infer=%dx%d", device,
             engine.name, engine.provider, ",".join(batches.stats["images_per_bucket"]) or "-", len(batches),
             dali_threads, infer_workers, infer_threads)
    decoder = Decoder(device, int(batches.batch_sizes().max(initial=1)), dali_threads, out_dtype=model.input_dtype)
    reader = ShardReader(Path(cfg.dataset) / "shards")
    sink = RunSink(cfg.out, model.names, metadata, cfg.commit_images)
    metrics = MetricsRecorder(device)
    if len(bad):
        sink.add_images(-1, bad.column("image_id").to_pylist(), bad.column("path").to_pylist(),
                        bad.column("width").to_pylist(), bad.column("height").to_pylist(),
                        bad.column("status").to_pylist(), bad.column("error").to_pylist(), [None] * len(bad))

    progress = _progress(len(good), cfg.quiet)

    def read(work: _Work):
        work.encoded = reader.get_many(work.batch.shard, work.batch.keys)

    def decode(work: _Work):
        missing = {i: "bytes missing from shard" for i, data in enumerate(work.encoded) if data is None}
        encoded = [data if data is not None else b"" for data in work.encoded]
        work.decoded = decoder.decode(work.batch, encoded)
        work.decoded.errors.update(missing)
        work.encoded = None  # each stage drops what later stages do not need: bounded memory

    def infer(work: _Work):
        work.outputs = engine.infer(work.decoded.tensor)
        work.decoded.tensor = None

    def post(work: _Work):
        work.detections = postprocess(work.outputs[0], work.batch, len(model.names) or None, cfg.conf,
                                      cfg.iou, cfg.max_det, model.end2end)
        work.outputs = None

    def write(work: _Work):
        batch, errors = work.batch, work.decoded.errors
        status = ["decode_error" if i in errors else "ok" for i in range(len(batch))]
        sink.add_images(batch.shard, batch.image_ids, batch.paths, batch.width, batch.height, status,
                        [errors.get(i) for i in range(len(batch))],
                        [None if i in errors else d for i, d in enumerate(work.detections)])
        progress.failed += len(errors)
        progress.update(len(batch))
        if errors:
            progress.set_postfix(failed=progress.failed, refresh=False)

    def record(work: _Work):
        metrics.record(work.batch, work.times, len(work.decoded.errors))

    pipeline = StagePipeline([("read", read), ("decode", decode), Stage("infer", infer, infer_workers),
                              ("postprocess", post), ("write", write)], on_done=record)
    try:
        pipeline.run(_Work(b) for b in batches)
    except BaseException as exc:
        # Every stage has stopped; what was written is complete. Say how the run ended.
        run_json.update(state="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                        error=f"{type(exc).__name__}: {exc}", finished=time.time())
        write_json_atomic(run_json, cfg.out / "run.json")
        raise
    finally:
        # Rows already buffered are complete results: commit them so a re-run resumes after them.
        sink.close()
        progress.close()
        reader.close()
    metrics.write(cfg.out / "metrics.parquet")

    statuses = read_images(cfg.out, ["status", "n_det"])
    by_status = Counter(statuses.column("status").to_pylist())
    summary = RunSummary(
        images=len(statuses), failed=len(statuses) - by_status.get("ok", 0),
        detections=int(pc.sum(statuses.column("n_det")).as_py() or 0), by_status=dict(by_status),
        wall_s=time.time() - t_start, processed=len(good), stage_s=metrics.stage_totals())
    run_json.update(state="complete", finished=time.time(), totals=asdict(summary),
                    device=device, backend=engine.name, provider=engine.provider)
    write_json_atomic(run_json, cfg.out / "run.json")
    return summary


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(device: str, dali: int | None = None, infer: int | None = None,
                    workers: int | None = None) -> tuple[int, int, int]:
    """(DALI threads, ONNX Runtime intra-op threads per call, concurrent inference calls).

    Values given are kept. On CPU, decoding costs about a sixth of the model's work (see
    docs/performance.md), so DALI gets a sixth of the cores (at least one). ONNX Runtime
    wastes less CPU running batches side by side, one thread each, than splitting one
    batch over threads: up to 4 workers, the cores shared between them. On GPU the CPU
    only decodes, so DALI gets all the cores and one call feeds the device.
    """
    cores = usable_cores()
    if device == "gpu":
        return dali or cores, infer or cores, workers or 1
    workers = workers or min(cores, 4)
    return dali or max(1, cores // 6), infer or max(1, cores // workers), workers


def pa_array(values):
    import pyarrow as pa

    return pa.array(sorted(values), pa.int64())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="run", disable=quiet, dynamic_ncols=True)
    bar.failed = 0
    return bar
