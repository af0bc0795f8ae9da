"""The pipelined runner: order, bounded items in flight, clean stop on errors and Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import bulkdet.run.runner as runner
from bulkdet.run.pipeline import Stage, StagePipeline
from bulkdet.run.runner import RunConfig, default_threads
from bulkdet.store.parts import images_parts, read_detections, read_images
from conftest import ROOT, make_images


class Item:
    def __init__(self, i):
        self.i = i
        self.trace = []


def run_in_thread(pipeline, items, timeout=20):
    """Run the pipeline; fail (instead of hanging the suite) if it does not end in time."""
    outcome = {}

    def target():
        try:
            pipeline.run(items)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "pipeline did not end"
    return outcome.get("error")


def bulkdet_threads():
    return [t for t in threading.enumerate() if t.name.startswith("bulkdet-")]


def test_several_workers_hand_on_in_order_and_in_flight_stays_bounded():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, 60)
    created, done, in_flight = [0], [], []

    def items():
        for i in range(60):
            created[0] += 1
            in_flight.append(created[0] - len(done))
            yield Item(i)

    def slow(item):
        time.sleep(delays[item.i])
        item.trace.append("slow")

    stages = [("a", lambda it: it.trace.append("a")), Stage("slow", slow, 3), ("b", lambda it: it.trace.append("b"))]
    p = StagePipeline(stages, on_done=done.append, queue_size=2)
    assert run_in_thread(p, items()) is None
    assert [it.i for it in done] == list(range(60))  # plan order, despite 3 workers
    assert all(it.trace == ["a", "slow", "b"] for it in done)
    # queues (2 + 2 + 2, + 1 held by the feeder) + one per worker (1 + 3 + 1) + reorder buffer (< 3)
    assert max(in_flight) <= 2 + 2 + 2 + 1 + 5 + 2
    assert not bulkdet_threads()


@pytest.mark.parametrize("failing_stage", ["first", "middle", "last"])
def test_a_stage_error_stops_every_thread_and_is_raised(failing_stage):
    done = []

    def maybe_fail(name):
        def fn(item):
            if name == failing_stage and item.i == 7:
                raise ValueError(f"boom in {name}")
        return fn

    stages = [("first", maybe_fail("first")), Stage("middle", maybe_fail("middle"), 2), ("last", maybe_fail("last"))]
    p = StagePipeline(stages, on_done=done.append)
    error = run_in_thread(p, (Item(i) for i in range(1000)))
    assert isinstance(error, ValueError) and failing_stage in str(error)
    assert [it.i for it in done] == list(range(len(done))) and len(done) <= 7
    assert not bulkdet_threads()


def test_an_error_in_the_items_stops_the_stages():
    def items():
        yield Item(0)
        raise RuntimeError("manifest broke")

    p = StagePipeline([("a", lambda it: time.sleep(0.01)), Stage("b", lambda it: None, 2)])
    error = run_in_thread(p, items())
    assert isinstance(error, RuntimeError) and "manifest broke" in str(error)
    assert not bulkdet_threads()


def test_default_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    assert default_threads("cpu") == (1, 1, 2)  # one DALI thread; two batches side by side
    monkeypatch.setattr(runner, "usable_cores", lambda: 16)
    dali, threads, workers = default_threads("cpu")
    assert dali == 2 and workers == 4 and threads * workers == 16
    assert default_threads("cpu", 3, 5, 1) == (3, 5, 1)  # what the user sets is kept
    assert default_threads("gpu")[2] == 1


def check_committed_output(run_dir):
    """Every committed part is readable, images and detections agree, no temp files, no duplicates."""
    assert not list(run_dir.glob("*/*.tmp"))
    images = read_images(run_dir)
    ids = images.column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    dets = read_detections(run_dir)
    per_image = {}
    for i in dets.column("image_id").to_pylist():
        per_image[i] = per_image.get(i, 0) + 1
    assert {i: n for i, n in zip(ids, images.column("n_det").to_pylist()) if n} == per_image
    for part in images_parts(run_dir):
        assert (run_dir / "detections" / part.name).exists()
    return images


@pytest.fixture
def dataset(tmp_path, cli):
    specs = [(f"img{i:02d}.jpg", 160 + 16 * (i % 5), 120 + 8 * (i % 3), "jpeg", 1) for i in range(24)]
    truth = make_images(tmp_path / "src", specs, seed=2)
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    return tmp_path / "ds", truth


def test_stage_exception_keeps_committed_output_valid_and_resumable(tmp_path, dataset, analytic_model, monkeypatch):
    ds, truth = dataset
    out = tmp_path / "run"
    real = runner.postprocess
    calls = [0]

    def failing_postprocess(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("postprocess exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "postprocess", failing_postprocess)
    cfg = RunConfig(ds, analytic_model, out, max_batch=2, commit_images=4, quiet=True)
    with pytest.raises(RuntimeError, match="postprocess exploded"):
        runner.run(cfg)
    assert not bulkdet_threads()
    state = json.loads((out / "run.json").read_text())
    assert state["state"] == "failed" and "postprocess exploded" in state["error"]
    partial = check_committed_output(out)
    assert 0 < len(partial) < len(truth)

    monkeypatch.setattr(runner, "postprocess", real)
    summary = runner.run(RunConfig(ds, analytic_model, out, max_batch=2, commit_images=4, quiet=True))
    assert summary.processed == len(truth) - len(partial)  # resumed after the committed rows
    images = check_committed_output(out)
    assert sorted(images.column("path").to_pylist()) == sorted(t["path"] for t in truth)
    assert json.loads((out / "run.json").read_text())["state"] == "complete"


# bulkdet's CLI with a slow postprocess that says when it has done 3 batches.
SLOW_RUN = """
import os, pathlib, sys, time
import bulkdet.run.runner as r
real, calls = r.postprocess, [0]
def slow(*a, **k):
    time.sleep(0.15)
    calls[0] += 1
    if calls[0] == 3:
        pathlib.Path(os.environ["STARTED"]).touch()
    return real(*a, **k)
r.postprocess = slow
from bulkdet.cli import app
app(sys.argv[1:])
"""


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_completes(tmp_path, dataset, analytic_model):
    ds, truth = dataset
    out = tmp_path / "run"
    args = ["run", str(ds), "--model", str(analytic_model), "--out", str(out), "--max-batch", "1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STARTED": str(tmp_path / "started")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "started").exists():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)  # mid-run: 21 of 24 batches still to postprocess
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("bulkdet did not stop after Ctrl-C")
    assert proc.returncode not in (0, 3), err
    assert json.loads((out / "run.json").read_text())["state"] == "interrupted"
    partial = check_committed_output(out)
    assert len(partial) < len(truth)

    r = subprocess.run([sys.executable, "-m", "bulkdet", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    images = check_committed_output(out)
    assert sorted(images.column("path").to_pylist()) == sorted(t["path"] for t in truth)
    assert pq.read_table(out / "images").num_rows == len(truth)


@pytest.mark.parametrize("extra", [[], ["--precision", "fp16"]], ids=["fp32", "fp16"])
def test_run_reads_and_hashes_the_model_once(tmp_path, dataset, analytic_model, cli, monkeypatch, extra):
    """The CLI's check reads the model (before anything is written); the run goes on with what it read."""
    import shutil
    from pathlib import Path

    import bulkdet.model.info as info
    import bulkdet.model.precision as precision

    model = shutil.copy(analytic_model, tmp_path / "m.onnx")  # a file no other test reads meanwhile
    calls = []
    real_hash, real_read = info.file_sha256, info.read_onnx

    def counted(what, real):
        def call(path, *args, **kwargs):
            calls.append((what, Path(path).resolve()))
            return real(path, *args, **kwargs)
        return call

    for module in (info, precision):
        monkeypatch.setattr(module, "file_sha256", counted("hash", real_hash))
        monkeypatch.setattr(module, "read_onnx", counted("read", real_read))
    r = cli("run", dataset[0], "--model", model, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", "-q",
            *extra)
    assert r.exit_code == 0, r.output
    of_model = [what for what, path in calls if path == Path(model).resolve()]
    if not extra:  # fp32: the file that runs is --model, read and hashed by the check alone
        assert sorted(of_model) == ["hash", "read"], calls
    else:  # fp16 reads the source's metadata to prepare it; each file is hashed once
        assert of_model.count("hash") == 1, calls
        hashed = [path for what, path in calls if what == "hash"]
        assert len(hashed) == len(set(hashed)) == 2, calls  # --model and the prepared file
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["model"]["prepared"]["source_sha256"] == real_hash(model)
