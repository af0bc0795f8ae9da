"""`bulkdet run --ray`: one run over many GPUs and machines, by shard, exactly once.

The driver (this process) runs `runner.run` with this module's executor: the run folder is
opened, resumed and finished exactly as for a local run; the executor hands out shards one at a time: a worker that
finishes a shard gets the next one, so fast and slow workers both stay busy. A worker is a
Ray actor that builds its engine and decoder once, then runs each shard through the same
stages as a local run and commits its parts through the same sink.

A worker that dies is restarted by Ray, which retries the shard it was on; the retry first
drops the shard's uncommitted leftovers and skips the images it already committed
(`RunFolder.resume_shard`), so every image ends in exactly one committed row.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from collections import deque
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bulkdet.system.devices import select as select_device
from bulkdet.run.metrics import MetricsRecorder
from bulkdet.model.info import ModelInfo
from bulkdet.run.progress import Progress
from bulkdet.run.model_errors import ModelRunError
from bulkdet.run.runner import (ExecResult, RunConfig, RunJob, RunSummary, ShardProcessor, pa_array, run,
                                run_stages)
from bulkdet.store.run_folder import RunFolder

log = logging.getLogger("bulkdet")
MAX_RESTARTS = 3  # per worker; each restart retries the shard the worker was on
POLL_S = 0.5  # how often the driver asks busy workers how far they are


class ShardWorker:
    """A Ray actor: one engine and decoder, built once, for every shard it is given."""

    def __init__(self, cfg: RunConfig, model: ModelInfo):
        self.cfg = cfg
        self.count = Progress(0, quiet=True)  # of the current shard: read by progress()
        self.shard: int | None = None
        # An error here (a model the engine can't load, no GPU) is raised by info(), the driver's
        # first call: Ray then hands the driver bulkdet's own exception, as a local run raises it.
        # Raised in __init__, it would come back as Ray's "actor died" text with the traceback in it.
        self.start_error: Exception | None = None
        try:
            # The device is resolved here, on the worker's machine (Ray sets CUDA_VISIBLE_DEVICES).
            selection = select_device(cfg.device, cfg.backend, cfg.model)
            self.processor = ShardProcessor(cfg, model, selection.device, selection.backend)
        except Exception as exc:
            self.start_error = exc

    def info(self) -> dict:
        if self.start_error is not None:
            raise self.start_error
        engine = self.processor.engine
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": self.processor.device,
                "backend": engine.name, "provider": engine.provider}

    def progress(self) -> tuple[int | None, int, int, int]:
        """(shard, images written, their bytes, failed so far): answers while process_shard runs."""
        return self.shard, self.count.done, self.count.bytes, self.count.failed

    def process_shard(self, shard: int, rows: pa.Table, metadata: dict) -> dict:
        """Runs one shard's rows (bytes stored) and commits them; returns its metrics and counts."""
        folder = RunFolder(self.cfg.out)  # the driver holds the folder's lock
        committed = folder.resume_shard(shard)  # non-empty when this is a retry
        if committed:
            rows = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), pa_array(committed))))
        self.shard, self.count = shard, Progress(len(rows), quiet=True)
        worker = {"bulkdet.worker": f"{socket.gethostname()}:{os.getpid()}"}  # in each part's metadata
        metrics = MetricsRecorder(self.processor.device)  # in memory: the rows go back to the driver
        with folder.writer(self.processor.model.names, {**metadata, **worker}, self.cfg.commit_images) as writer:
            result = run_stages(self.processor, rows, writer, metrics, self.count)
        return {"shard": shard, "images": len(rows), "bytes": self.count.bytes, "failed": self.count.failed,
                "pid": os.getpid(), "host": socket.gethostname(), "t0_wall": _wall_time(metrics.t0),
                "metrics": metrics.rows, "fallback_decoded": result.fallback_decoded,
                "oom_splits": result.oom_splits, "plan": result.plan}


def run_on_ray(cfg: RunConfig, address: str | None = None, workers: int | None = None,
               source: ModelInfo | None = None) -> RunSummary:
    """Like runner.run, with the shards spread over Ray workers (one per GPU, or CPU workers)."""
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("--ray needs Ray: pip install 'bulkdet[ray]'")
    # Workers may run on other machines: they need paths that mean the same there (shared storage).
    cfg = replace(cfg, **{k: Path(v).absolute() for k in ("dataset", "model", "out", "names")
                          if (v := getattr(cfg, k)) is not None})
    return run(cfg, execute=partial(execute_on_ray, address=address, workers=workers), source=source)


def execute_on_ray(job: RunJob, todo: pa.Table, folder: RunFolder, address: str | None,
                   workers: int | None) -> ExecResult:
    """The rows left, shard by shard, on Ray workers that commit into `folder`."""
    cfg = job.cfg
    shards = split_by_shard(todo)
    # All workers' batches go into one metrics.parquet, on this process's clock.
    metrics = MetricsRecorder(cfg.device, folder.metrics_path, job.run_id)
    t0_wall = _wall_time(metrics.t0)
    counts = {"fallback_decoded": 0, "oom_splits": 0}  # summed over the workers' shards

    def collect(result: dict) -> None:
        for key in counts:
            counts[key] += result[key]
        shift = result["t0_wall"] - t0_wall
        metrics.add_rows([{k: v + shift if k.endswith(("_start", "_end")) and v is not None else v
                           for k, v in row.items()} for row in result["metrics"]])

    redone, workers_info, device, started = set(), [], cfg.device, 0
    with metrics:
        if shards:  # else everything was committed before: nothing for Ray to do
            redone, workers_info, device, started = _run_shards(cfg, job, shards, address, workers, collect)
    first = workers_info[0] if workers_info else {}
    return ExecResult(metrics.stage_totals(), counts["fallback_decoded"], counts["oom_splits"],
                      {"device": first.get("device", device), "backend": first.get("backend"),
                       "provider": first.get("provider"),
                       # `workers`: those that joined (a worker still starting when the last
                       # shard is given out never does), of `workers_started` asked for.
                       "ray": {"address": address, "workers_started": started, "workers": workers_info,
                               "shards": len(shards), "redone_shards": sorted(redone)}})


def _wall_time(perf_t: float) -> float:
    """time.time() at the moment perf_counter() read `perf_t` (clocks of workers on other machines
    agree through NTP; perf_counter values of two processes do not)."""
    return time.time() - (time.perf_counter() - perf_t)


def _run_shards(cfg: RunConfig, job: RunJob, shards: dict[int, pa.Table], address: str | None,
                workers: int | None, collect):
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=not cfg.quiet,
                 logging_level=logging.WARNING if cfg.quiet else logging.INFO)
    try:
        pool = _start_workers(ray, cfg, job.model, workers)
        progress = Progress(sum(len(rows) for rows in shards.values()), quiet=cfg.quiet)
        try:
            redone = _schedule(ray, pool, shards, job.metadata, progress, collect)
        finally:
            progress.close()
            for actor in pool.actors:
                ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
    return redone, list(pool.info.values()), pool.device, len(pool.actors)


def split_by_shard(rows: pa.Table) -> dict[int, pa.Table]:
    """Rows per shard, in shard order (each a compact table of its own, cheap to ship)."""
    rows = rows.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    shard = rows.column("shard").to_numpy()
    numbers, starts = np.unique(shard, return_index=True)
    ends = [*starts[1:], len(rows)]
    return {int(s): rows.take(np.arange(a, b)) for s, a, b in zip(numbers, starts, ends)}


class _Pool:
    def __init__(self, actors: list, device: str):
        self.actors = actors
        self.device = device  # what the workers were given resources for: "gpu" or "cpu"
        self.info: dict = {}  # actor index -> info() of its latest process


def _start_workers(ray, cfg: RunConfig, model: ModelInfo, workers: int | None) -> _Pool:
    """One actor per GPU (num_gpus=1), or CPU actors splitting the cluster's cores."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus > 0)
    if use_gpu:
        if gpus < 1:
            raise RuntimeError("--device gpu: the Ray cluster has no GPU")
        workers = workers or int(gpus)
        # Each GPU worker gets the CPU cores that go with one GPU on the GPU machines.
        cpus = max(1, min(int(n.get("CPU", 1) // n["GPU"]) for n in nodes if n.get("GPU")))
        resources = {"num_gpus": 1, "num_cpus": cpus}
    else:
        workers = workers or len(nodes)
        cpus = max(1, min(int(sum(n.get("CPU", 1) for n in nodes) // workers),
                          int(max(n.get("CPU", 1) for n in nodes))))
        resources = {"num_cpus": cpus}
    # Threads follow the cores a worker was given, not the machine's (several workers share it).
    cfg = replace(cfg, dali_threads=cfg.dali_threads or cpus, infer_threads=cfg.infer_threads or cpus)
    remote = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                        max_concurrency=2)(ShardWorker)  # 2: progress() answers during process_shard
    actors = [remote.options(**resources).remote(cfg, model) for _ in range(workers)]
    log.info("ray: %d worker(s) with %s each", workers, resources)
    return _Pool(actors, "gpu" if use_gpu else "cpu")


def _schedule(ray, pool: _Pool, shards: dict[int, pa.Table], metadata: dict, progress: Progress, collect):
    """Streams shards to workers as they become free; each result goes to `collect`.

    A worker joins when it has started (its info() came back), so a cluster that grows while
    the run goes on gets used, and one worker that cannot start does not stop the others.
    Returns the shards that finished in a restarted worker (redone after a worker died).
    """
    from ray.exceptions import RayActorError, RayTaskError

    todo = deque(sorted(shards))
    total = {s: len(t) for s, t in shards.items()}
    starting = {a.info.remote(): i for i, a in enumerate(pool.actors)}
    running: dict = {}  # task ref -> (actor index, shard, pid of the worker it was given to)
    probes: dict = {}  # progress ref -> actor index
    seen: dict[int, tuple[int, int, int]] = {}  # shard -> (images written, bytes, failed) as last reported
    shown = (0, 0, 0)  # what the progress bar has been told
    redone = set()
    last_poll = 0.0

    def give(i: int):
        if todo:
            shard = todo.popleft()
            ref = pool.actors[i].process_shard.remote(shard, shards.pop(shard), metadata)
            running[ref] = (i, shard, pool.info[i]["pid"])

    while todo or running:
        if not starting and not running:
            raise RuntimeError("no Ray worker could start; see the Ray logs")
        ready, _ = ray.wait([*starting, *running], num_returns=1, timeout=POLL_S)
        for ref in ready:
            if ref in starting:
                i = starting.pop(ref)
                try:
                    pool.info[i] = ray.get(ref)
                except RayTaskError as exc:  # the worker could not start: the error a local run gives
                    raise exc.cause from exc  # (--debug shows the worker's traceback)
                except RayActorError as exc:
                    raise RuntimeError(f"a Ray worker failed to start: {exc}") from None
                give(i)
                continue
            i, shard, pid = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:
                raise RuntimeError(f"shard {shard}: its worker died {MAX_RESTARTS + 1} times; committed "
                                   "parts are kept, run the same command again to resume") from None
            except RayTaskError as exc:
                if isinstance(exc.cause, ModelRunError):  # the model failed in the engine: its one line
                    raise exc.cause from None
                raise
            if result["pid"] != pid:  # the worker died and Ray redid the shard in a new process
                redone.add(shard)
                pool.info[i] = {**pool.info[i], "pid": result["pid"], "host": result["host"]}
            seen[shard] = (total[shard], result["bytes"], result["failed"])
            collect(result)
            give(i)
        polled = time.monotonic() - last_poll >= POLL_S
        if polled:
            last_poll = time.monotonic()
            _poll_progress(ray, pool, running, probes, seen)
        if ready or polled:
            # A redone shard counts its images once: never more than the shard holds.
            now = (sum(min(n, total[s]) for s, (n, _, _) in seen.items()),
                   sum(b for _, b, _ in seen.values()), sum(f for _, _, f in seen.values()))
            progress.update(*(max(0, a - b) for a, b in zip(now, shown)))
            shown = tuple(max(a, b) for a, b in zip(now, shown))
    return redone


def _poll_progress(ray, pool: _Pool, running: dict, probes: dict, seen: dict) -> None:
    """Collects answers to earlier progress() calls and asks each busy worker again (never blocks)."""
    from ray.exceptions import GetTimeoutError, RayError

    if probes:
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=0)
        for ref in ready:
            probes.pop(ref)
            try:
                shard, n, nbytes, failed = ray.get(ref, timeout=0)
            except (RayError, GetTimeoutError):
                continue  # a worker that died answers again once restarted
            if shard is not None and n >= seen.get(shard, (0, 0, 0))[0]:
                seen[shard] = (n, nbytes, failed)
    asked = set(probes.values())
    for i, _, _ in running.values():
        if i not in asked:
            probes[pool.actors[i].progress.remote()] = i

