"""`bulkdet run`: one run, start to end: resolve the model, open the run folder, execute, finish.

`run()` is the same for a local run and a Ray run: it decides what the run is (`RunJob`),
opens the run folder (store/run_folder.py: lock, identity, resume), writes the rows of images
that failed at pack, hands the rows left to an executor, and finishes the folder with totals
counted from the committed parts. The local executor runs every row through `run_stages`
(read -> decode -> infer -> postprocess -> write, threads and bounded queues) in this process;
run/distributed.py's runs the same `run_stages` per shard on Ray workers.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
import uuid
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bulkdet import __version__
from bulkdet.engines import create_engine, model_info
from bulkdet.engines.base import fixed_batch
from bulkdet.model.info import InputNorm, ModelInfo, class_ids, model_input_hw, model_norm
from bulkdet.model.layouts import LayoutError, detect, detect_batch
from bulkdet.model.precision import DEFAULT_CALIB_IMAGES, ModelFile, model_for_run, with_nms
from bulkdet.run.calibration import decoded_batches
from bulkdet.run.decode import Decoder
from bulkdet.run.metrics import STAGES, BatchTimes, MetricsRecorder
from bulkdet.run.model_errors import model_load_error, model_run_error
from bulkdet.run.oom import HalvingInfer
from bulkdet.run.pipeline import QUEUE_SIZE, Stage, StagePipeline
from bulkdet.run.plan import DEFAULT_DECODE_BUDGET, Batch, BatchPlan, default_pixel_budget, input_shapes, plan
from bulkdet.run.postprocess import INFER_ERROR, postprocess
from bulkdet.run.precision_check import check_run_precision
from bulkdet.run.progress import Progress
from bulkdet.run.tiles import ImageAssembler, TileSettings, expand as expand_tiles
from bulkdet.store.manifest import dataset_id, processed, read_manifest, unprocessed
from bulkdet.store.run_folder import PartWriter, RunFolder
from bulkdet.store.readers import Unreadable, open_dataset_reader
from bulkdet.system.devices import Selection, select as select_device

log = logging.getLogger("bulkdet")


@dataclass
class RunConfig:
    dataset: Path
    model: Path
    out: Path
    _: KW_ONLY
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
    precision_check_images: int = 0  # images also run through the FP32 model to measure drift
    calib_images: int = DEFAULT_CALIB_IMAGES  # INT8 calibration images drawn from the dataset
    cache_dir: Path | None = None  # prepared models and TensorRT engines (default: store.cache.cache_dir())
    hw_decoder_load: float | None = None  # share of JPEGs for the GPU's hardware decoder
    nms_in_model: bool = False  # append NMS to the graph: only final detections leave the engine
    pixel_budget: int | None = None  # input pixels per batch (None: plan.default_pixel_budget)
    decode_budget: int | None = None  # original pixels decoded at once (None: DEFAULT_DECODE_BUDGET)
    infer_workers: int | None = None  # batches inferred at once (None: default_threads)
    layout: str | None = None  # the model's output layout (model/layouts.py); None: told by its outputs
    tiles: TileSettings = field(default_factory=TileSettings)  # --tile: sliced inference (run/tiles.py)
    classes: list[str] | None = None  # keep only these classes (names or ids; None: all)
    norm: InputNorm | None = None  # --input-scale / --mean / --std (None: the model's metadata's, else none)

    # fsspec options for a dataset packed by reference from a URL. They may hold credentials: not
    # part of the run's identity, never written (see `recorded`), not shown in a repr.
    storage_options: dict | None = field(default=None, repr=False)

    def recorded(self) -> dict:
        """The settings as run.json keeps them: plain data, without storage_options (credentials)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k != "storage_options"}


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


@dataclass
class RunJob:
    """What a run decides once, before any image is processed (the driver's half of a run)."""

    cfg: RunConfig
    selection: Selection
    model_file: ModelFile  # the file that runs (fp16/int8/NMS made from --model)
    model: ModelInfo  # of model_file
    run_id: str
    identity: dict  # what the results depend on: a run folder holds results of one identity
    metadata: dict  # key-value metadata of every part
    run_json: dict


@dataclass
class StageResult:
    """What one `run_stages` call did, besides the rows it wrote."""

    plan: dict  # the planner's statistics (buckets, padding)
    fallback_decoded: int  # images DALI rejected that the CPU fallback decoded
    oom_splits: int  # batches split in halves after running out of memory


@dataclass
class ExecResult:
    """What an executor hands back to `run()` for run.json and the summary."""

    stage_s: dict
    fallback_decoded: int
    oom_splits: int
    run_info: dict  # device, backend, provider, plan, threads (and ray: workers, shards)
    precision_check: str = ""


Executor = Callable[[RunJob, pa.Table, RunFolder], ExecResult]


def run(cfg: RunConfig, execute: Executor | None = None, source: ModelInfo | None = None) -> RunSummary:
    """Open the run folder, execute the rows left (in this process unless `execute` says where), finish.
    `source`: --model as the command line read and checked it (with --names), not read again."""
    t_start = time.time()
    job = resolve_job(cfg, source=source)
    manifest = read_manifest(cfg.dataset)
    with RunFolder.open(cfg.out, job.identity, overwrite=cfg.overwrite) as folder:
        if cfg.retry_failed:
            folder.drop_failed_rows(retryable_ids(manifest, cfg.shards))
        todo, unstored = rows_left(manifest, folder.done, cfg.shards)
        folder.start(job.run_json)
        with folder.writer(job.model.names, job.metadata, cfg.commit_images) as writer:
            writer.add_unstored(unstored)
        result = (execute or execute_local)(job, todo, folder)
        summary = RunSummary(**folder.totals(), wall_s=time.time() - t_start, processed=len(todo),
                             stage_s=result.stage_s, fallback_decoded=result.fallback_decoded,
                             oom_splits=result.oom_splits, precision_check=result.precision_check)
        folder.finish(totals=asdict(summary), **result.run_info)
    return summary


def resolve_job(cfg: RunConfig, selection: Selection | None = None, source: ModelInfo | None = None) -> RunJob:
    """Device, the model file that runs (prepared for --precision / --nms-in-model), identity, run.json.
    `source`: cfg.model already read (with cfg.names): neither read nor hashed again."""
    selection = selection or select_device(cfg.device, cfg.backend, cfg.model)
    model_file = model_for_run(cfg.model, cfg.precision, cfg.dataset, cfg.calib_images, cfg.imgsz,
                               cfg.cache_dir, selection.device,
                               feed=partial(decoded_batches, storage_options=cfg.storage_options),
                               source_sha256=source.sha256 if source else None, norm=cfg.norm)
    if cfg.nms_in_model:
        if cfg.layout not in (None, "yolov8"):
            raise LayoutError(f"--nms-in-model supports the yolov8 layout only, not --layout {cfg.layout}: "
                              f"run without --nms-in-model (bulkdet applies the NMS its layout needs)")
        model_file = with_nms(model_file, cfg.conf, cfg.iou, cfg.max_det, cfg.cache_dir)
    if source is not None and model_file.sha256 == source.sha256:  # the file that runs is --model itself
        model = replace(source, path=model_file.path)
    else:  # a file prepared from it (fp16 / int8 / NMS), hashed as it was made
        model = model_info(model_file.path, cfg.names, model_file.sha256)
    layout = start_layout(cfg, model)  # None: told by the shapes of the first batch
    norm = model_norm(cfg.norm, model)
    identity = {"model_sha256": model.sha256, "conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det,
                "imgsz": cfg.imgsz, "precision": cfg.precision, "names": model.names,
                "dataset_id": dataset_id(cfg.dataset), "tiles": cfg.tiles.identity(),
                **({"layout": cfg.layout} if cfg.layout else {}),
                **({} if norm.is_default else {"input_norm": norm.as_dict()}),
                **({"classes": kept} if (kept := class_ids(cfg.classes, model.names)) else {})}
    run_id = uuid.uuid4().hex[:12]
    metadata = {"bulkdet.run_id": run_id, "bulkdet.version": __version__, "model_sha256": model.sha256,
                "conf": cfg.conf, "iou": cfg.iou, "imgsz": cfg.imgsz, "precision": cfg.precision}
    run_json = {"run_id": run_id, "started": time.time(), "dataset": str(Path(cfg.dataset).resolve()),
                "config": cfg.recorded(),
                "model": {"path": str(cfg.model), "sha256": model.sha256, "names": model.names,
                          "input_hw": model_input_hw(cfg.imgsz, model.stride, model.fixed_shape),
                          "input_dtype": np.dtype(model.input_dtype).name, "input_norm": norm.as_dict(),
                          "prepared": model_file.as_dict(),
                          "layout": layout, "outputs": [[name, list(dims)] for name, dims in model.outputs]},
                "device_selection": asdict(selection), "environment": environment()}
    return RunJob(cfg, selection, model_file, model, run_id, identity, metadata, run_json)


def start_layout(cfg: RunConfig, model: ModelInfo, values=None) -> str | None:
    """The output layout, from the model's declared outputs (or, with `values`, one batch's real
    outputs); None while a dynamic dimension hides it. LayoutError when nothing fits."""
    # --nms-in-model made the model that runs: its output is end2end, whatever the source's was.
    override = None if cfg.nms_in_model and model.end2end else cfg.layout or model.layout_hint
    told = (len(model.names) or None, model.end2end, override)
    return detect(model.outputs, *told) if values is None else detect_batch(model.outputs, values, *told)


def rows_left(manifest: pa.Table, done: set[int], shards: list[int] | None) -> tuple[pa.Table, pa.Table]:
    """(rows to process, rows written as they are: failed at pack), not committed yet, of our shards."""
    if done:
        manifest = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), pa_array(done))))
    if shards is not None:
        manifest = manifest.filter(pc.is_in(manifest.column("shard"), pa_array(shards).cast("int32")))
    return processed(manifest), unprocessed(manifest)


def retryable_ids(manifest: pa.Table, shards: list[int] | None) -> set[int]:
    """Images --retry-failed can process again: those a run processes (bytes stored), of our shards."""
    return set(rows_left(manifest, set(), shards)[0].column("image_id").to_pylist())


def execute_local(job: RunJob, todo: pa.Table, folder: RunFolder) -> ExecResult:
    """Every row through the stages in this process; parts committed into `folder`."""
    cfg = job.cfg
    processor = ShardProcessor(cfg, job.model, job.selection.device, job.selection.backend)
    progress = Progress(len(todo), quiet=cfg.quiet)
    drift = None
    try:
        if cfg.precision_check_images:
            drift = check_run_precision(cfg, job.model_file, todo, processor)
            if drift:
                folder.update(precision_check=drift.as_dict())
        metrics = MetricsRecorder(processor.device, folder.metrics_path, job.run_id)
        with metrics, folder.writer(job.model.names, job.metadata, cfg.commit_images) as writer:
            result = run_stages(processor, todo, writer, metrics, progress)
    finally:
        progress.close()
        processor.close()
    engine = processor.engine
    return ExecResult(metrics.stage_totals(), result.fallback_decoded, result.oom_splits,
                      {"device": processor.device, "backend": engine.name, "provider": engine.provider,
                       "plan": result.plan, "threads": processor.threads,
                       "model": {**job.run_json["model"], "layout": processor.layout}},  # told at the first batch
                      drift.summary() if drift else "")


def environment() -> dict:
    import nvidia.dali
    import onnxruntime

    return {"bulkdet": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "pyarrow": pa.__version__,
            "dali": nvidia.dali.__version__, "onnxruntime": onnxruntime.__version__}


class _Work:
    """One batch travelling through the stages; each stage fills in its part."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.encoded = None
        self.encoded_bytes = 0
        self.unreadable: dict[int, Unreadable] = {}  # index in batch -> why its bytes can't be used
        self.decoded = None
        self.outputs = None
        self.detections = None
        self.images_written = 0
        self.times = BatchTimes()


class ShardProcessor:
    """Engine, decoder and shard reader, built once per process and reused for any rows.

    A local run holds one; a Ray actor holds one for the shards it is given.
    """

    def __init__(self, cfg: RunConfig, model: ModelInfo, device: str, backend: str = "onnxruntime"):
        self.cfg = cfg
        self.model = model
        self.device = device
        self.input_hw = model_input_hw(cfg.imgsz, model.stride, model.fixed_shape)
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
        try:
            self.engine = create_engine(backend, model.path, device=device, threads=infer_threads,
                                        shapes=self.shapes, cache_dir=cfg.cache_dir, ring_slots=ring_slots)
        except (ValueError, RuntimeError):
            raise  # bulkdet's own, already saying what to do
        except Exception as exc:  # the engine's (e.g. ONNX Runtime's NotImplemented for an op it lacks)
            raise model_load_error(cfg.model, backend, exc, cfg.precision) from exc
        self.decoder = Decoder(device, self.max_batch, dali_threads, out_dtype=self.engine.input_dtype,
                               hw_decoder_load=cfg.hw_decoder_load,
                               decode_budget=cfg.decode_budget or DEFAULT_DECODE_BUDGET,
                               norm=model_norm(cfg.norm, model))
        # Its shards, or the source (packed by reference).
        self.reader = open_dataset_reader(cfg.dataset, storage_options=cfg.storage_options)
        self._last_read: tuple | None = None  # (shard, key, bytes) of the last image a batch read
        # A fixed-batch model gets batches of exactly model.batch (padded); a batch that runs out of
        # memory is halved (and the halves padded again).
        self.infer = HalvingInfer(fixed_batch(self.engine.infer, model.batch))
        self.output_names = [name for name, _ in model.outputs] or None
        self.layout = start_layout(cfg, model)  # None: told at the first batch
        self.class_ids = class_ids(cfg.classes, model.names)  # --classes: only these kept (None: all)
        self._layout_lock = threading.Lock()

    def plan(self, rows: pa.Table) -> BatchPlan:
        """The batches the run makes of `rows` (with --tile, of their tiles: run/tiles.py)."""
        cfg = self.cfg
        items = expand_tiles(rows, cfg.tiles) if cfg.tiles.on else rows
        pixel_budget = cfg.pixel_budget or default_pixel_budget(self.device, self.input_hw[0], self.max_batch)
        return plan(items, cfg.imgsz, self.max_batch, stride=self.model.stride, fixed_hw=self.model.fixed_shape,
                    pixel_budget=pixel_budget, decode_budget=cfg.decode_budget or DEFAULT_DECODE_BUDGET)

    def read(self, batch: Batch) -> dict[bytes, bytes | Unreadable]:
        """The bytes of the batch's images by key, each image read once: the tiles of an image
        share its bytes (one copy, not one a tile), and the last image a batch read is kept for
        the next (its tiles continue there: a 100-megapixel JPEG is not re-read each batch)."""
        first: dict[bytes, int] = {}
        for i, key in enumerate(batch.keys):
            first.setdefault(key, i)
        got = {}
        if self._last_read and self._last_read[0] == batch.shard and self._last_read[1] in first:
            got[self._last_read[1]] = self._last_read[2]
        if rows := [i for key, i in first.items() if key not in got]:
            keys = [batch.keys[i] for i in rows]
            got.update(zip(keys, self.reader.read(batch.shard, batch.image_ids[rows], keys)))
        last = batch.keys[-1]
        self._last_read = (batch.shard, last, got[last])
        return {key: got[key] for key in first}

    def layout_for(self, outputs: list[np.ndarray]) -> str:
        """The run's layout; the first batch's outputs tell it where declared shapes could not."""
        with self._layout_lock:
            if self.layout is None:
                self.layout = start_layout(self.cfg, self.model, outputs)
                log.info("output layout: %s", self.layout)
            return self.layout

    def close(self) -> None:
        self.reader.close()
        self.engine.close()


def run_stages(processor: ShardProcessor, rows: pa.Table, writer: PartWriter, metrics: MetricsRecorder,
               progress) -> StageResult:
    """Runs manifest rows (bytes stored) through read -> ... -> write into `writer`.

    `progress` counts what was written: a `Progress` (shown or quiet).
    """
    cfg, device = processor.cfg, processor.device
    engine, decoder = processor.engine, processor.decoder
    # --tile: the planned items are tiles (run/tiles.py), and the writer gets complete images only.
    assembler = ImageAssembler(cfg.tiles, cfg.max_det) if cfg.tiles.on else None
    batches = processor.plan(rows)
    fallback_images: set[int] = set()  # decoded by the CPU fallback (a tiled image counts once, however many batches)
    splits_before = processor.infer.splits
    log.info("device=%s backend=%s provider=%s buckets=%s batches=%d threads=%s", device, engine.name,
             engine.provider, ",".join(batches.stats["images_per_bucket"]) or "-", len(batches), processor.threads)

    def read(work: _Work):
        batch = work.batch
        got = processor.read(batch)
        encoded = [got[key] for key in batch.keys]
        work.unreadable = {i: data for i, data in enumerate(encoded) if isinstance(data, Unreadable)}
        work.encoded = [b"" if i in work.unreadable else data for i, data in enumerate(encoded)]
        work.encoded_bytes = sum(len(data) for data in got.values() if not isinstance(data, Unreadable))

    def decode(work: _Work):
        work.decoded = decoder.decode(work.batch, work.encoded)
        work.decoded.errors.update({i: u.error for i, u in work.unreadable.items()})
        fallback_images.update(work.batch.image_ids[work.decoded.fallback].tolist())
        work.decoded.tensor = engine.stage(work.decoded.tensor)  # GPU: into the engine's input buffer
        work.encoded = None  # each stage drops what later stages do not need: bounded memory

    def infer(work: _Work):
        try:
            work.outputs = processor.infer(work.decoded.tensor)
        except Exception as exc:  # the model failed in the engine: one line (model, batch shape, cause)
            shape = (len(work.batch), 3, *work.batch.input_hw)
            raise model_run_error(cfg.model, shape, exc, cfg.precision) from exc
        finally:
            engine.release(work.decoded.tensor)  # GPU: the input buffer goes back to the ring
            work.decoded.tensor = None

    def post(work: _Work):
        work.detections = postprocess(work.outputs, work.batch, processor.layout_for(work.outputs), cfg.conf,
                                      cfg.iou, cfg.max_det, processor.output_names, processor.class_ids)
        work.outputs = None

    def write(work: _Work):
        batch, errors, dets = work.batch, work.decoded.errors, work.detections
        pack_status = batch.pack_status or ["ok"] * len(batch)  # "corrupt" stays, with its detections
        pack_error = batch.pack_error or [None] * len(batch)
        status = [work.unreadable[i].status if i in work.unreadable else "decode_error" if i in errors
                  else INFER_ERROR if dets[i].error else pack_status[i] for i in range(len(batch))]
        columns = (batch.image_ids, batch.paths, batch.width, batch.height, status,
                   [errors.get(i) or dets[i].error or pack_error[i] for i in range(len(batch))],
                   [None if i in errors or d.error else d for i, d in enumerate(dets)])
        if assembler is not None:  # tile items: only the images whose last item this is
            columns = assembler.add(batch, *columns[4:])
            if columns is None:
                progress.update(0, work.encoded_bytes, 0)
                return
            status = columns[4]
        writer.add_images(batch.shard, *columns)
        work.images_written = len(status)
        progress.update(len(status), work.encoded_bytes, len(status) - status.count("ok"))

    def record(work: _Work):
        metrics.record(work.batch, work.times, len(work.decoded.errors), work.encoded_bytes, work.images_written)

    work = {"read": read, "decode": decode, "infer": infer, "postprocess": post, "write": write}
    pipeline = StagePipeline([Stage(name, work[name], processor.infer_workers if name == "infer" else 1)
                              for name in STAGES], on_done=record)
    pipeline.run(_Work(b) for b in batches)
    if assembler is not None and assembler.pending:  # every item ran: an image left is a bug, not a result
        raise RuntimeError(f"{len(assembler.pending)} tiled image(s) did not get all their tiles")
    return StageResult(batches.stats, len(fallback_images), processor.infer.splits - splits_before)


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
