import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bulkdet.run.postprocess import Detections
from bulkdet.store.parts import read_detections, read_images
from bulkdet.store.run_folder import ConfigMismatch, PartWriter, RunFolder


def dets(n, cls=0):
    return Detections(np.tile(np.array([[1, 2, 3, 4]], np.float32), (n, 1)), np.full(n, 0.5, np.float32),
                      np.full(n, cls, np.int16))


def add(sink, shard, ids, detections):
    n = len(ids)
    sink.add_images(shard, ids, [f"p{i}" for i in ids], [10] * n, [20] * n,
                    ["ok" if d is not None else "decode_error" for d in detections],
                    [None if d is not None else "bad" for d in detections], detections)


def test_parts_per_shard_schema_metadata_and_journal(tmp_path):
    RunFolder.open(tmp_path, {"model_sha256": "x"})._release()
    sink = PartWriter(tmp_path, {0: "cat", 1: "dog"}, {"model_sha256": "x"}, commit_images=100)
    add(sink, 0, [0, 1], [dets(2), dets(1, cls=1)])
    add(sink, 1, [2], [None])  # new shard: shard 0's rows are committed first
    sink.close()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "part-s00000-00000.parquet", "part-s00001-00000.parquet"]
    images = read_images(tmp_path)
    assert images.column("n_det").to_pylist() == [2, 1, 0]
    assert images.column("status").to_pylist() == ["ok", "ok", "decode_error"]
    d = read_detections(tmp_path)
    assert d.column("class_name").to_pylist() == ["cat", "cat", "dog"]
    assert d.schema.field("class_name").type.value_type == "string"
    meta = pq.read_schema(tmp_path / "images" / "part-s00000-00000.parquet").metadata
    assert meta[b"model_sha256"] == b"x"
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [(j["part"], j["images"], j["failed"]) for j in journal] == [
        ("part-s00000-00000.parquet", 2, 0), ("part-s00001-00000.parquet", 1, 1)]


def test_resume_skips_committed_and_drops_uncommitted(tmp_path):
    fp = {"model_sha256": "x", "conf": 0.25}
    RunFolder.open(tmp_path, fp)._release()
    sink = PartWriter(tmp_path, {}, {}, commit_images=2)
    add(sink, 0, [0, 1], [dets(1), dets(1)])  # committed (reaches commit_images)
    add(sink, 0, [2], [dets(1)])  # buffered only: lost when "killed"
    sink.journal.close()
    # What a kill leaves behind: a temp file and a detections part without its images part.
    (tmp_path / "images" / "part-s00000-00001.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "detections" / "part-s00000-00009.parquet").write_bytes(b"orphan")
    with RunFolder.open(tmp_path, fp) as folder:
        assert folder.done == {0, 1}
    assert not list(tmp_path.glob("*/*.tmp"))
    assert not (tmp_path / "detections" / "part-s00000-00009.parquet").exists()
    sink = PartWriter(tmp_path, {}, {}, commit_images=2)
    add(sink, 0, [2], [dets(1)])
    sink.close()
    assert sorted(read_images(tmp_path).column("image_id").to_pylist()) == [0, 1, 2]
    assert (tmp_path / "images" / "part-s00000-00001.parquet").exists()  # numbering continues


def test_other_settings_refused_unless_overwrite(tmp_path):
    RunFolder.open(tmp_path, {"model_sha256": "a", "conf": 0.25})._release()
    sink = PartWriter(tmp_path, {}, {}, commit_images=1)
    add(sink, 0, [0], [dets(1)])
    sink.close()
    with pytest.raises(ConfigMismatch, match="conf"):
        RunFolder.open(tmp_path, {"model_sha256": "a", "conf": 0.5})
    with RunFolder.open(tmp_path, {"model_sha256": "a", "conf": 0.5}, overwrite=True) as folder:
        assert folder.done == set()
    assert not list((tmp_path / "images").iterdir())


# ------------------------------------------------------------------------------------------
# The run folder defends itself (hostile uses of --out), end to end through the CLI
# ------------------------------------------------------------------------------------------

import os
import signal
import subprocess
import sys

from conftest import ROOT, make_images

from bulkdet.store.lock import FolderLock

ARGS = ("--imgsz", 64, "--max-batch", 4, "--commit-every", 4, "-q")


@pytest.fixture
def ds(tmp_path, cli):
    make_images(tmp_path / "src", [(f"im_{i:02d}.jpg", 48 + 4 * i, 64, "jpeg", 1) for i in range(14)], seed=3)
    (tmp_path / "src" / "not_an_image.jpg").write_bytes(b"hello")
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    return tmp_path / "ds"


def _rows(run_dir):
    images = sorted(read_images(run_dir).to_pylist(), key=lambda r: r["image_id"])
    dets = sorted(read_detections(run_dir).to_pylist(), key=lambda d: (d["image_id"], d["x1"], d["class_id"]))
    return images, dets


@pytest.fixture
def baseline(ds, analytic_model, cli, tmp_path):
    assert cli("run", ds, "--model", analytic_model, "--out", tmp_path / "baseline", *ARGS).exit_code == 3
    return _rows(tmp_path / "baseline")


def _run_json(out):
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(ds, analytic_model, cli, tmp_path, overwrite):
    proj = tmp_path / "proj"
    (proj / "images").mkdir(parents=True)
    (proj / "images" / "photo.jpg").write_bytes(b"the user's photo")
    (proj / "notes" ).mkdir()
    (proj / "notes" / "draft.tmp").write_text("the user's draft")
    before = sorted(str(p.relative_to(proj)) for p in proj.rglob("*"))
    r = cli("run", ds, "--model", analytic_model, "--out", proj, *ARGS, *(["--overwrite"] * overwrite))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and "not a bulkdet run" in r.output and "Traceback" not in r.output
    assert sorted(str(p.relative_to(proj)) for p in proj.rglob("*")) == before
    assert (proj / "images" / "photo.jpg").read_bytes() == b"the user's photo"


def test_out_that_is_a_file_is_refused(ds, analytic_model, cli, tmp_path):
    (tmp_path / "out.txt").write_text("mine")
    r = cli("run", ds, "--model", analytic_model, "--out", tmp_path / "out.txt", *ARGS)
    assert r.exit_code == 2 and "is a file" in r.output
    assert (tmp_path / "out.txt").read_text() == "mine"


def test_overwrite_removes_only_what_a_run_wrote(ds, analytic_model, cli, tmp_path, baseline):
    out = tmp_path / "run"
    assert cli("run", ds, "--model", analytic_model, "--out", out, *ARGS).exit_code == 3
    (out / "my-notes.txt").write_text("keep me")
    (out / "images" / "README").write_text("keep me too")
    r = cli("run", ds, "--model", analytic_model, "--out", out, *ARGS, "--conf", 0.5, "--overwrite")
    assert r.exit_code == 3, r.output
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert (out / "images" / "README").read_text() == "keep me too"
    assert len(read_images(out)) == len(baseline[0])  # one row per file, none doubled


def _hold_lock(folder):
    """Another process that holds the run folder's lock until killed."""
    code = ("import sys, time; from bulkdet.store.lock import FolderLock; "
            "lock = FolderLock(sys.argv[1], 'run').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_exits_2_naming_the_holder_and_a_dead_holder_is_taken_over(
        ds, analytic_model, cli, tmp_path, baseline):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        r = cli("run", ds, "--model", analytic_model, "--out", out, *ARGS)
        assert r.exit_code == 2, r.output
        assert f"pid {holder.pid}" in r.output and "in use by another bulkdet run" in r.output
        assert not (out / "images").exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = cli("run", ds, "--model", analytic_model, "--out", out, *ARGS)  # the dead holder's lock is free
    assert r.exit_code == 3, r.output
    assert _rows(out) == baseline


def test_lock_is_exclusive_between_open_files_of_one_process(tmp_path):
    with FolderLock(tmp_path, "run"):
        with pytest.raises(Exception, match="in use"):
            FolderLock(tmp_path, "run").acquire()
    FolderLock(tmp_path, "run").acquire().release()  # free again once released


def test_a_run_folder_of_another_dataset_is_refused(ds, analytic_model, cli, tmp_path):
    out = tmp_path / "run"
    assert cli("run", ds, "--model", analytic_model, "--out", out, *ARGS).exit_code == 3
    make_images(tmp_path / "other", [(f"x_{i}.png", 64, 48, "png", 1) for i in range(5)], seed=9)
    assert cli("pack", tmp_path / "other", "--out", tmp_path / "ds2", "-q").exit_code == 0
    before = _rows(out)
    r = cli("run", tmp_path / "ds2", "--model", analytic_model, "--out", out, *ARGS)
    assert r.exit_code == 2 and "dataset_id" in r.output, r.output
    assert _rows(out) == before


def test_a_failed_start_does_not_block_the_corrected_command(ds, analytic_model, cli, tmp_path, monkeypatch,
                                                             baseline):
    out = tmp_path / "run"

    def no_engine(*args, **kwargs):
        raise RuntimeError("the engine could not be built")

    monkeypatch.setattr("bulkdet.run.runner.create_engine", no_engine)
    r = cli("run", ds, "--model", analytic_model, "--out", out, *ARGS, "--conf", 0.9)
    assert r.exit_code == 1 and "could not be built" in r.output
    state = _run_json(out)
    assert state["state"] == "failed" and "could not be built" in state["error"]
    monkeypatch.undo()
    r = cli("run", ds, "--model", analytic_model, "--out", out, *ARGS)  # other --conf: nothing to protect yet
    assert r.exit_code == 3, r.output
    assert _rows(out) == baseline and _run_json(out)["state"] == "complete"


def test_broken_committed_parts_are_redone_and_totals_come_from_the_parts(ds, analytic_model, cli, tmp_path,
                                                                          baseline):
    out = tmp_path / "run"
    assert cli("run", ds, "--model", analytic_model, "--out", out, *ARGS).exit_code == 3
    parts = sorted((out / "detections").glob("part-s*.parquet"))
    assert len(parts) >= 3
    parts[0].unlink()  # a deleted detections part
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])  # a truncated one
    r = cli("run", ds, "--model", analytic_model, "--out", out, "--imgsz", 64, "--max-batch", 4,
            "--commit-every", 4)
    assert r.exit_code == 3, r.output
    assert f"{len(baseline[1])} detections" in r.output
    assert _rows(out) == baseline
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert {j["part"] for j in journal if "dropped_broken" in j} == {parts[0].name, parts[1].name}
