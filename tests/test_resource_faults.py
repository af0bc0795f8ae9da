"""Resource faults: out of memory in a batch (halve and retry), disk full while writing.

Both faults are real: ONNX Runtime with a memory-capped arena raises its own allocation
error, and the disk-full error is the kernel's ENOSPC from /dev/full. Only the moment is
chosen by the test, at our own file-writing boundary.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import threading

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

import bulkdet.store.run_folder
from bulkdet.store.atomic import TMP_SUFFIX, copy_atomic, write_parquet_atomic
from bulkdet.engines.onnxruntime import OnnxRuntimeEngine
from bulkdet.run.oom import HalvingInfer, OutOfMemory, is_out_of_memory
from bulkdet.store.parts import images_parts, read_detections, read_images
from conftest import make_images

ARENA_CAP = 1 << 20  # 1 MiB: one 64x64 image fits through the analytic model, 16 do not


@functools.lru_cache(maxsize=None)
def _register_capped_arena() -> None:
    """A process-wide CPU arena capped at ARENA_CAP, used only by sessions that opt in."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(ARENA_CAP, -1, -1, -1))


def capped_engine(model_path) -> OnnxRuntimeEngine:
    """The real ONNX Runtime engine, its session drawing from the capped arena."""
    _register_capped_arena()
    engine = OnnxRuntimeEngine(model_path, threads=1)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.use_env_allocators", "1")
    opts.log_severity_level = 4  # the allocation failures are expected here
    engine.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return engine


def test_onnxruntime_allocation_failure_is_recognised_and_halved(analytic_model):
    engine = capped_engine(analytic_model)
    batch = np.random.default_rng(0).random((16, 3, 64, 64), dtype=np.float32)
    with pytest.raises(Exception) as info:
        engine.infer(batch)
    assert is_out_of_memory(info.value), info.value

    halving = HalvingInfer(engine.infer)
    (out,) = halving(batch)
    (expected,) = OnnxRuntimeEngine(analytic_model, threads=1).infer(batch)
    assert np.array_equal(out, expected)
    assert halving.splits == 1 and halving.limit < 16
    halving(batch)  # later batches start at the size that worked
    assert halving.splits == 1


def test_other_errors_are_not_taken_for_out_of_memory(analytic_model):
    engine = OnnxRuntimeEngine(analytic_model, threads=1)
    halving = HalvingInfer(engine.infer)
    with pytest.raises(Exception) as info:
        halving(np.zeros((4, 3, 64), np.float32))  # wrong rank: ONNX Runtime's own error
    assert not is_out_of_memory(info.value) and halving.splits == 0


def test_out_of_memory_with_one_image_is_an_error():
    def never_fits(batch):
        raise MemoryError()

    with pytest.raises(OutOfMemory, match="batch of one image"):
        HalvingInfer(never_fits)(np.zeros((8, 3, 4, 4), np.float32))


def test_one_image_out_of_memory_beside_another_call_is_retried_alone():
    """The inference workers share the memory: one image that fails while another call holds
    it fits once that call has ended. Only a failure alone means the run is out of memory."""
    holding, release, failed_beside = threading.Event(), threading.Event(), threading.Event()

    def infer(batch):  # the memory fits one call at a time
        if batch.flat[0] == 1:  # the other call: holds the memory until released
            holding.set()
            release.wait(10)
            holding.clear()
            return [batch]
        if holding.is_set():
            failed_beside.set()
            raise MemoryError()
        return [batch * 2]

    halving = HalvingInfer(infer)
    other = threading.Thread(target=halving, args=(np.ones((1, 3, 2, 2), np.float32),))
    other.start()
    assert holding.wait(10)
    outcome = {}

    def one_image():
        try:
            outcome["out"] = halving(np.full((1, 3, 2, 2), 3, np.float32))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            outcome["error"] = exc

    worker = threading.Thread(target=one_image)
    worker.start()
    assert failed_beside.wait(10)  # out of memory beside the other call; now waits for it to end
    release.set()
    other.join(10)
    worker.join(10)
    assert "error" not in outcome, outcome["error"]
    assert np.array_equal(outcome["out"][0], np.full((1, 3, 2, 2), 6, np.float32))
    assert halving.splits == 0 and halving.limit is None  # one image: nothing was split


@pytest.fixture
def small_dataset(tmp_path, cli):
    specs = [(f"img_{i:02d}.jpg", 48 + 4 * i, 64, "jpeg", 1) for i in range(24)]
    make_images(tmp_path / "src", specs, seed=5)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    return tmp_path / "ds"


def _results(run_dir):
    images = read_images(run_dir).sort_by("image_id").to_pylist()
    dets = sorted(read_detections(run_dir).to_pylist(), key=lambda d: (d["image_id"], d["class_id"]))
    return images, dets


def test_out_of_memory_in_a_run_halves_the_batch_and_loses_nothing(small_dataset, analytic_model, cli, tmp_path,
                                                                   monkeypatch):
    args = ("--imgsz", 64, "--max-batch", 16, "--infer-workers", 2, "-q")  # two workers share the arena
    r = cli("run", small_dataset, "--model", analytic_model, "--out", tmp_path / "plain", *args)
    assert r.exit_code == 3, r.output
    monkeypatch.setattr("bulkdet.run.runner.create_engine", lambda *a, **k: capped_engine(analytic_model))
    r = cli("run", small_dataset, "--model", analytic_model, "--out", tmp_path / "capped", *args)
    assert r.exit_code == 3, r.output
    assert "batch(es) split after running out of memory" in r.output
    assert _results(tmp_path / "capped") == _results(tmp_path / "plain")
    totals = json.loads((tmp_path / "capped" / "run.json").read_text())["totals"]
    assert totals["oom_splits"] >= 1


def test_atomic_write_on_a_full_disk_leaves_nothing_behind(tmp_path):
    target = tmp_path / "part.parquet"
    os.symlink("/dev/full", tmp_path / ("part.parquet" + TMP_SUFFIX))  # writes there fail with ENOSPC
    with pytest.raises(OSError) as info:
        write_parquet_atomic(pa.table({"a": [1, 2, 3]}), target)
    assert info.value.errno == errno.ENOSPC
    assert not target.exists() and not os.path.lexists(tmp_path / ("part.parquet" + TMP_SUFFIX))


def test_a_copy_into_a_users_folder_takes_no_file_of_theirs_for_its_temporary(tmp_path):
    """Outside bulkdet's own folders (prepare --out, report --html, the cache) the temporary name
    holds the process id: a user's `model.onnx.tmp` is not overwritten, nor removed."""
    theirs = tmp_path / "out" / ("model.onnx" + TMP_SUFFIX)
    theirs.parent.mkdir()
    theirs.write_text("the user's")
    source = tmp_path / "source.onnx"
    source.write_bytes(b"model bytes")
    assert copy_atomic(source, tmp_path / "out" / "model.onnx", per_process=True).read_bytes() == b"model bytes"
    assert theirs.read_text() == "the user's"
    assert sorted(p.name for p in theirs.parent.iterdir()) == ["model.onnx", "model.onnx" + TMP_SUFFIX]

def _disk_full_at(monkeypatch, call: int) -> None:
    """The `call`-th part write of the run goes to a full device (a real ENOSPC)."""
    real = bulkdet.store.run_folder.write_parquet_atomic
    calls = []

    def write(table, path, **kwargs):
        calls.append(path)
        if len(calls) == call:
            os.symlink("/dev/full", path.with_name(path.name + TMP_SUFFIX))
        return real(table, path, **kwargs)

    monkeypatch.setattr(bulkdet.store.run_folder, "write_parquet_atomic", write)


@pytest.mark.parametrize("failing_write", [5, 6])  # a detections part; an images part (the commit)
def test_disk_full_exits_1_keeps_committed_parts_and_resumes(small_dataset, analytic_model, cli, tmp_path,
                                                             monkeypatch, failing_write):
    args = ("--imgsz", 64, "--max-batch", 4, "--commit-every", 4, "-q")
    assert cli("run", small_dataset, "--model", analytic_model, "--out", tmp_path / "plain", *args).exit_code == 3
    out = tmp_path / "run"
    _disk_full_at(monkeypatch, failing_write)
    r = cli("run", small_dataset, "--model", analytic_model, "--out", out, *args)
    assert r.exit_code == 1
    assert "disk full" in r.output and "run the same command again" in r.output
    assert "Traceback" not in r.output
    committed = (failing_write - 1) // 2  # two writes per part: detections, then images
    assert len(images_parts(out)) == committed
    assert not list(out.rglob(f"*{TMP_SUFFIX}"))  # the partial file was removed at once
    assert json.loads((out / "run.json").read_text())["state"] == "failed"
    assert len(read_images(out)) > 0  # what was committed is readable

    monkeypatch.undo()
    r = cli("run", small_dataset, "--model", analytic_model, "--out", out, *args)
    assert r.exit_code == 3, r.output
    assert _results(out) == _results(tmp_path / "plain")
