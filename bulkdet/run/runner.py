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
import pyarrow as pa
import pyarrow.compute as pc

from bulkdet import __version__
from bulkdet.store.atomic import write_json_atomic
from bulkdet.run.decode import Decoder
from bulkdet.system.devices import Selection, select as select_device
from bulkdet.engines import create_engine, model_info
from bulkdet.run.metrics import BatchTimes, MetricsRecorder
from bulkdet.model.info import ModelInfo
from bulkdet.run.pipeline import QUEUE_SIZE, Stage, StagePipeline
from bulkdet.run.plan import DEFAULT_DECODE_BUDGET, Batch, default_pixel_budget, input_shapes, plan
from bulkdet.run.postprocess import INFER_ERROR, postprocess
from bulkdet.run.oom import HalvingInfer
from bulkdet.run.precision_check import check_run_precision
from bulkdet.model.precision import DEFAULT_CALIB_IMAGES, PreparedModel, describe, prepare_for_run, with_nms
from bulkdet.run.progress import Progress
from bulkdet.store.parts import RunSink, drop_failed_rows, prepare_run_dir, read_images
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
    retry_failed: bool = False  # process again the images whose committed row is not ok
    check_precision: int = 0  # images also run through the FP32 model to measure drift
    calib_images: int = DEFAULT_CALIB_IMAGES  # INT8 calibration images drawn from the dataset
    cache_dir: Path | None = None  # prepared models and TensorRT engines (default: prepare.cache_dir())
    hw_decoder_load: float | None = None  # share of JPEGs for the GPU's hardware decoder
    nms_in_model: bool = False  # append NMS to the graph: only final detections leave the engine
    pixel_budget: int | None = None  # input pixels per batch (None: plan.default_pixel_budget)
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
    fallback_decoded: int = 0  # images DALI rejected and the CPU fallback decoded
    oom_splits: int = 0  # batches split in halves after running out of memory
    precision_check: str = ""  # one-line drift summary when --check-precision ran


class _Work:
    """One batch travelling through the stages; each stage fills in its part."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.encoded = None
        self.encoded_bytes = 0
        self.decoded = None
        self.outputs = None
        self.detections = None
        self.times = BatchTimes()


def environment() -> dict:
    import nvidia.dali
    import onnxruntime
    import pyarrow

    return {"bulkdet": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "pyarrow": pyarrow.__version__,
            "dali": nvidia.dali.__version__, "onnxruntime": onnxruntime.__version__}


def run(cfg: RunConfig) -> RunSummary:
    selection = select_device(cfg.device, cfg.backend, cfg.model)
    device = selection.device
    prepared = prepare_run(cfg, selection)
    processor = ShardProcessor(cfg, prepared.model, device, selection.backend)
    drift = None
    if cfg.check_precision:
        drift = check_run_precision(cfg, prepared.prepared_model, prepared.todo, processor)
        if drift:
            prepared.run_json["precision_check"] = drift.as_dict()
            write_json_atomic(prepared.run_json, cfg.out / "run.json")
    sink = RunSink(cfg.out, prepared.model.names, prepared.metadata, cfg.commit_images)
    metrics = MetricsRecorder(device, cfg.out / "metrics.parquet", prepared.run_json["run_id"])
    progress = Progress(len(prepared.todo), quiet=cfg.quiet)
    try:
        add_unstored(sink, prepared.unstored)
        run_stages(processor, prepared.todo, sink, metrics, progress)
    except BaseException as exc:
        # Every stage has stopped (see pipeline.py); what was committed is complete. Say how it ended.
        prepared.run_json.update(plan=processor.plan_stats, threads=processor.threads, finished=time.time(),
                                 state="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                                 error=f"{type(exc).__name__}: {exc}")
        write_json_atomic(prepared.run_json, cfg.out / "run.json")
        raise
    finally:
        # Rows already buffered are complete results: commit them so a re-run resumes after them.
        sink.close()
        progress.close()
        processor.close()
        metrics.close()
    summary = finish_run(cfg, prepared, metrics, processor.fallback_decoded, processor.infer.splits,
                         device=device, backend=processor.engine.name,
                         provider=processor.engine.provider, plan=processor.plan_stats, threads=processor.threads)
    summary.precision_check = drift.summary() if drift else ""
    return summary


@dataclass
class PreparedRun:
    """What a run decides once, before any image is processed (the driver's half of a run)."""

    model: ModelInfo
    metadata: dict  # key-value metadata of every part
    run_json: dict
    todo: pa.Table  # manifest rows with bytes in a shard, not committed yet
    unstored: pa.Table  # manifest rows with no bytes (failed at pack), not committed yet
    t_start: float
    prepared_model: PreparedModel | None = None  # the file that runs (fp16/int8/NMS made from --model)


def prepare_run(cfg: RunConfig, selection: Selection | None = None) -> PreparedRun:
    """Checks RUN_DIR's fingerprint, writes run.json (running), returns the rows left to do."""
    t_start = time.time()
    selection = selection or select_device(cfg.device, cfg.backend, cfg.model)
    prepared_model = prepare_for_run(cfg.model, cfg.precision, cfg.dataset, cfg.calib_images, cfg.imgsz,
                                     cfg.cache_dir, selection.device)
    if cfg.nms_in_model:
        prepared_model = with_nms(prepared_model, cfg.conf, cfg.iou, cfg.max_det, cfg.cache_dir)
    model = model_info(prepared_model.path, cfg.names)
    input_hw = _input_hw(model, cfg)
    fingerprint = {"model_sha256": model.sha256, "conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det,
                   "imgsz": cfg.imgsz, "precision": cfg.precision,
                   "names": model.names}
    done = prepare_run_dir(cfg.out, fingerprint, cfg.overwrite)
    run_id = uuid.uuid4().hex[:12]
    metadata = {"bulkdet.run_id": run_id, "bulkdet.version": __version__, "model_sha256": model.sha256,
                "conf": cfg.conf, "iou": cfg.iou, "imgsz": cfg.imgsz, "precision": cfg.precision}
    run_json = {"run_id": run_id, "state": "running", "started": t_start,
                "dataset": str(Path(cfg.dataset).resolve()),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                "model": {"path": str(cfg.model), "sha256": model.sha256, "names": model.names,
                          "input_hw": input_hw, "input_dtype": np.dtype(model.input_dtype).name,
                          "prepared": describe(prepared_model)},
                "device_selection": asdict(selection),
                "environment": environment()}
    write_json_atomic(run_json, cfg.out / "run.json")

    manifest = read_manifest(cfg.dataset)
    if cfg.retry_failed:
        done -= drop_failed_rows(cfg.out, _retryable_ids(manifest, cfg.shards))
    if done:
        manifest = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), pa_array(done))))
    if cfg.shards is not None:
        manifest = manifest.filter(pc.is_in(manifest.column("shard"), pa_array(cfg.shards).cast("int32")))
    is_ok = pc.equal(manifest.column("status"), "ok")
    bad = manifest.filter(pc.invert(is_ok))
    good = manifest.filter(is_ok)
    return PreparedRun(model, metadata, run_json, good, bad, t_start, prepared_model)


def add_unstored(sink: RunSink, bad: pa.Table) -> None:
    """Images that failed at pack have no bytes to process: their rows go out as they are."""
    if len(bad):
        sink.add_images(-1, bad.column("image_id").to_pylist(), bad.column("path").to_pylist(),
                        bad.column("width").to_pylist(), bad.column("height").to_pylist(),
                        bad.column("status").to_pylist(), bad.column("error").to_pylist(), [None] * len(bad))


class ShardProcessor:
    """Engine, decoder and shard reader, built once per process and reused for any rows.

    A local run holds one; a Ray actor holds one for the shards it is given.
    """

    def __init__(self, cfg: RunConfig, model: ModelInfo, device: str, backend: str = "onnxruntime"):
        self.cfg = cfg
        self.model = model
        self.device = device
        self.input_hw = _input_hw(model, cfg)
        self.max_batch = model.batch or cfg.max_batch
        # Input shapes the GPU engines take (buffers, TensorRT profiles): batch 1..max_batch at
        # every input size the planner makes (its aspect buckets). Not taken from the rows left,
        # so that a resumed run finds the same cached engine.
        self.shapes = [(self.max_batch, h, w) for h, w in input_shapes(cfg.imgsz, model.stride, model.fixed_shape)]
        dali_threads, infer_threads, self.infer_workers = default_threads(
            device, cfg.dali_threads, cfg.infer_threads, cfg.infer_workers)
        self.threads = {"dali": dali_threads, "infer": infer_threads, "infer_workers": self.infer_workers}
        # GPU input buffers in use at once: the decoder's, those queued for inference, the workers'.
        ring_slots = 1 + QUEUE_SIZE + self.infer_workers
        # model.path: the prepared file (fp16/int8/NMS) when --precision or --nms-in-model made one.
        self.engine = create_engine(backend, model.path, device=device, threads=infer_threads,
                                    shapes=self.shapes, cache_dir=cfg.cache_dir, ring_slots=ring_slots)
        self.decoder = Decoder(device, self.max_batch, dali_threads, out_dtype=self.engine.input_dtype,
                               hw_decoder_load=cfg.hw_decoder_load)
        self.reader = ShardReader(Path(cfg.dataset) / "shards")
        self.infer = HalvingInfer(self.engine.infer)  # halves a batch that runs out of memory
        self.fallback_decoded = 0  # images DALI rejected that the CPU fallback decoded
        self.plan_stats: dict | None = None  # of the last rows planned (run.json "plan")

    def close(self) -> None:
        self.reader.close()
        self.engine.close()


def run_stages(processor: ShardProcessor, good: pa.Table, sink: RunSink, metrics: MetricsRecorder,
               progress) -> None:
    """Runs manifest rows (status ok) through read -> ... -> write into `sink`.

    `progress` counts what was written: a `Progress` (shown or quiet).
    """
    cfg, model, device, input_hw = processor.cfg, processor.model, processor.device, processor.input_hw
    engine, decoder, reader = processor.engine, processor.decoder, processor.reader
    batches = plan(good, cfg.imgsz, processor.max_batch, stride=model.stride, fixed_hw=model.fixed_shape,
                   pixel_budget=cfg.pixel_budget or default_pixel_budget(device, input_hw[0], processor.max_batch),
                   decode_budget=cfg.decode_budget or DEFAULT_DECODE_BUDGET)
    processor.plan_stats = batches.stats
    log.info("device=%s backend=%s provider=%s buckets=%s batches=%d threads=%s", device, engine.name,
             engine.provider, ",".join(batches.stats["images_per_bucket"]) or "-", len(batches), processor.threads)

    def read(work: _Work):
        work.encoded = reader.get_many(work.batch.shard, work.batch.keys)
        work.encoded_bytes = sum(len(data) for data in work.encoded if data is not None)

    def decode(work: _Work):
        missing = {i: "bytes missing from shard" for i, data in enumerate(work.encoded) if data is None}
        encoded = [data if data is not None else b"" for data in work.encoded]
        work.decoded = decoder.decode(work.batch, encoded)
        work.decoded.errors.update(missing)
        processor.fallback_decoded += len(work.decoded.fallback)
        work.decoded.tensor = engine.stage(work.decoded.tensor)  # GPU: into the engine's input buffer
        work.encoded = None  # each stage drops what later stages do not need: bounded memory

    def infer(work: _Work):
        try:
            work.outputs = processor.infer(work.decoded.tensor)
        finally:
            engine.release(work.decoded.tensor)  # GPU: the input buffer goes back to the ring
            work.decoded.tensor = None

    def post(work: _Work):
        work.detections = postprocess(work.outputs[0], work.batch, len(model.names) or None, cfg.conf,
                                      cfg.iou, cfg.max_det, model.end2end)
        work.outputs = None

    def write(work: _Work):
        batch, errors, dets = work.batch, work.decoded.errors, work.detections
        status = ["decode_error" if i in errors else INFER_ERROR if dets[i].error else "ok"
                  for i in range(len(batch))]
        sink.add_images(batch.shard, batch.image_ids, batch.paths, batch.width, batch.height, status,
                        [errors.get(i) or dets[i].error for i in range(len(batch))],
                        [None if i in errors or d.error else d for i, d in enumerate(dets)])
        progress.update(len(batch), work.encoded_bytes, len(batch) - status.count("ok"))

    def record(work: _Work):
        metrics.record(work.batch, work.times, len(work.decoded.errors), work.encoded_bytes)

    pipeline = StagePipeline([("read", read), ("decode", decode), Stage("infer", infer, processor.infer_workers),
                              ("postprocess", post), ("write", write)], on_done=record)
    pipeline.run(_Work(b) for b in batches)


def finish_run(cfg: RunConfig, prepared: PreparedRun, metrics: MetricsRecorder, fallback_decoded: int = 0,
               oom_splits: int = 0, **run_info) -> RunSummary:
    """Totals from the committed parts; run.json marked complete with `run_info` (device, backend...)."""
    run_json = prepared.run_json
    statuses = read_images(cfg.out, ["status", "n_det"])
    by_status = Counter(statuses.column("status").to_pylist())
    summary = RunSummary(
        images=len(statuses), failed=len(statuses) - by_status.get("ok", 0),
        detections=int(pc.sum(statuses.column("n_det")).as_py() or 0), by_status=dict(by_status),
        wall_s=time.time() - prepared.t_start, processed=len(prepared.todo), stage_s=metrics.stage_totals(),
        fallback_decoded=fallback_decoded, oom_splits=oom_splits)
    run_json.update(state="complete", finished=time.time(), totals=asdict(summary), **run_info)
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
    return pa.array(sorted(values), pa.int64())


def _retryable_ids(manifest, shards: list[int] | None) -> set[int]:
    """Images that --retry-failed can process again: those whose bytes are stored (of our shards)."""
    stored = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    if shards is not None:
        stored = stored.filter(pc.is_in(stored.column("shard"), pa_array(shards).cast("int32")))
    return set(stored.column("image_id").to_pylist())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _retryable_ids(manifest, shards: list[int] | None) -> set[int]:
    """Images that --retry-failed can process again: those whose bytes are stored (of our shards)."""
    stored = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    if shards is not None:
        stored = stored.filter(pc.is_in(stored.column("shard"), pa_array(shards).cast("int32")))
    return set(stored.column("image_id").to_pylist())


def _input_hw(model: ModelInfo, cfg: RunConfig) -> tuple[int, int]:
    return model.fixed_shape or (_round_up(cfg.imgsz, model.stride),) * 2
