"""Exactly-once output: kill -9 at planned points, resume, and get what an uninterrupted run gets.

Also: a run killed between its two renames, --retry-failed, and refusing a RUN_DIR made with
other settings.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bulkdet.synthetic import draw_upright, random_rects
from bulkdet.ingest.pack import pack
from bulkdet.run.runner import RunConfig, run
from bulkdet.store.parts import read_detections, read_images
from bulkdet.store.run_folder import RunFolder
from conftest import ROOT, make_images

# Small and fast: tiny images and input, and a commit every 2 images, so a run makes many
# parts and a kill lands between, inside or before commits.
RUN_ARGS = ("--imgsz", 64, "--max-batch", 2, "--commit-every", 2, "-q")
N_GOOD = 60


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, analytic_model):
    """60 good images, a truncated JPEG, a text file, an animated GIF (decoded by the fallback)."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(11)
    specs = [(f"d{i % 3}/img_{i:03d}.{'png' if i % 4 == 0 else 'jpg'}", int(rng.integers(40, 120)),
              int(rng.integers(40, 120)), "png" if i % 4 == 0 else "jpeg", int((1, 6, 3, 8)[i % 4]))
             for i in range(N_GOOD)]
    make_images(root / "src", specs, seed=3)
    good = (root / "src" / specs[1][0]).read_bytes()
    (root / "src" / "bad_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "src" / "bad_text.jpg").write_text("not an image")
    frames = [Image.fromarray(draw_upright(72, 56, random_rects(72, 56, 3, rng), seed=s)).quantize(256)
              for s in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    (root / "src" / "anim.gif").write_bytes(buf.getvalue())
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds"


@pytest.fixture(scope="module")
def baseline(dataset, analytic_model, tmp_path_factory):
    """The uninterrupted run everything else must reproduce."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    run(RunConfig(dataset, analytic_model, out, imgsz=64, max_batch=2, commit_images=2, quiet=True))
    return out


def results(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Images and detections rows, in a canonical order (parts may be cut differently)."""
    images = read_images(run_dir).sort_by("image_id").to_pylist()
    dets = read_detections(run_dir).to_pylist()
    dets.sort(key=lambda d: (d["image_id"], d["class_id"], d["score"], d["x1"], d["y1"]))
    return images, dets


def assert_same_as_baseline(run_dir: Path, baseline: Path) -> None:
    images, dets = results(run_dir)
    ids = [r["image_id"] for r in images]
    assert len(ids) == len(set(ids)), "an image has two rows"
    expected_images, expected_dets = results(baseline)
    assert images == expected_images
    assert dets == expected_dets
    assert not list(run_dir.rglob("*.tmp"))


def _journal(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


# bulkdet's CLI, killed with SIGKILL (by itself, so exactly there) the n-th time it reaches a
# step of writing the run folder, KILL_AT="step:n". The steps show in os.replace and os.fsync:
#   run.json                 run.json (state "running") renamed into place: started, nothing committed
#   detections-written       a detections part's temporary file written, not yet renamed
#   detections               a detections part renamed into place, its images part not yet written
#   images-written           an images part's temporary file written, not yet renamed
#   images                   an images part renamed into place (the commit), its journal line not yet
#   journal                  a journal line fsynced: between two commits
KILL_RUN = """
import os, signal, sys
from pathlib import Path
step, n = os.environ["KILL_AT"].split(":")
seen = [0]
def reached(event):
    if event == step:
        seen[0] += 1
        if seen[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_fsync = os.replace, os.fsync
def replace(src, dst, **kwargs):
    real_replace(src, dst, **kwargs)
    dst = Path(dst)
    reached(dst.parent.name if dst.parent.name in ("images", "detections") else dst.name)
def fsync(fd):
    path = Path(os.readlink(f"/proc/self/fd/{fd}"))
    if path.name.endswith(".tmp") and path.parent.name in ("images", "detections"):
        reached(path.parent.name + "-written")
    real_fsync(fd)
    if path.name == "journal.jsonl":
        reached("journal")
os.replace, os.fsync = replace, fsync
from bulkdet.cli import app
app(sys.argv[1:])
"""

# One run per kill, each resuming the last: every step of a commit, and a resume right after
# the commit/journal gap. Together they reach at most 13 of the run's 32 commits (checked), so
# every kill lands before the run could finish and the final resume still has most of the work.
KILLS = [("run.json", 1), ("detections-written", 2), ("detections", 3), ("journal", 2), ("images", 3),
         ("images-written", 2)]


def _journaled_by(step: str, n: int) -> int:
    """Journal lines a run killed at (step, n) wrote: the n-th commit's too only at "journal"."""
    return 0 if step == "run.json" else n if step == "journal" else n - 1


def _left_by_kill(run_dir: Path) -> str:
    """Which step's leftovers the run folder holds beyond its journaled parts ("" for none)."""
    journaled = {j["part"] for j in _journal(run_dir)}
    images, detections = ({p.name for p in (run_dir / d).glob("*.parquet")} for d in ("images", "detections"))
    for step, left in (("detections-written", list((run_dir / "detections").glob("*.tmp"))),
                       ("images-written", list((run_dir / "images").glob("*.tmp"))),
                       ("images", images - journaled), ("detections", detections - images)):
        if left:
            return step
    return ""


@pytest.mark.slow
def test_kill_9_at_planned_points_then_resume_gives_identical_output(dataset, baseline, analytic_model, cli,
                                                                   tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert sum(n for _, n in KILLS) < len(_journal(baseline)), "the kills would reach the end of the run"
    lines, recovered, pending = 0, 0, 0
    for step, n in KILLS:
        args = ["run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS]
        proc = subprocess.run([sys.executable, "-c", KILL_RUN, *map(str, args)], env={**env, "KILL_AT": f"{step}:{n}"},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {step}:{n}: {proc.stderr[-2000:]}"
        # Exactly the planned progress: the lines of the parts committed, and the line that a
        # resume recovers for the part committed just before a kill at "images".
        journal = _journal(out)
        lines += pending + _journaled_by(step, n)
        recovered += pending
        assert len(journal) == lines, (step, n, journal)
        assert sum(bool(j.get("recovered")) for j in journal) == recovered, (step, n, journal)
        pending = int(step == "images")
        assert _left_by_kill(out) == ("" if step in ("run.json", "journal") else step)
        # A reader sees only complete parts, each image at most once, even right after a kill.
        if (out / "images").exists():
            ids = [i for p in sorted((out / "images").glob("*.parquet"))
                   for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist()]
            assert len(ids) == len(set(ids)), f"duplicate rows after the kill at {step}:{n}"
            for p in (out / "detections").glob("*.parquet"):
                pq.read_table(p)

    r = cli("run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS)
    assert r.exit_code == 3, r.output  # finished; the truncated JPEG and the text file failed
    assert_same_as_baseline(out, baseline)
    journal = _journal(out)
    assert {j["part"] for j in journal} == {p.name for p in (out / "images").glob("*.parquet")}
    assert sum(bool(j.get("recovered")) for j in journal) == 1


def test_resume_after_a_kill_between_the_two_renames(dataset, baseline, analytic_model, cli, tmp_path):
    """The state a kill leaves inside a commit: detections part renamed, images part not,
    a temporary file, a torn journal line. Resume removes the orphans and redoes that part."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    last = sorted((out / "images").glob("part-s*.parquet"))[-1]
    lost = pq.read_metadata(last).num_rows
    last.rename(last.with_name(last.name + ".tmp"))  # never renamed into place
    (out / "detections" / "part-s00000-99999.parquet.tmp").write_bytes(b"PAR1 half a file")
    journal = (out / "journal.jsonl").read_text().splitlines()
    (out / "journal.jsonl").write_text("\n".join(journal[:-1]) + "\n" + journal[-1][:10])
    assert (out / "detections" / last.name).exists()
    lost_ids = set(pq.read_table(last.with_name(last.name + ".tmp")).column("image_id").to_pylist())

    # What resume finds: the orphan detections part and the temporary files are gone, and the
    # lost images are not counted as done (so they are redone, whatever part names come next).
    with RunFolder.open(out, json.loads((out / "fingerprint.json").read_text())) as folder:
        done = folder.done
    assert not (out / "detections" / last.name).exists() and not list(out.rglob("*.tmp"))
    assert done == {r["image_id"] for r in results(baseline)[0]} - lost_ids

    r = cli("run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS)
    assert r.exit_code == 3, r.output
    assert f"({lost} processed now)" in r.output
    assert_same_as_baseline(out, baseline)
    lines = (out / "journal.jsonl").read_text().splitlines()
    parts = {json.loads(line)["part"] for line in lines if line.startswith("{") and line.endswith("}")}
    assert parts == {p.name for p in (out / "images").glob("*.parquet")}


def test_retry_failed_reprocesses_only_failed_images(dataset, baseline, analytic_model, cli, tmp_path,
                                                     monkeypatch):
    out = tmp_path / "run"

    def no_cpu_decoder(*args, **kwargs):
        raise OSError("CPU decoder unavailable")

    # First run without a working CPU fallback: the GIF fails too.
    monkeypatch.setattr("bulkdet.run.decode.pillow_letterbox", no_cpu_decoder)
    r = cli("run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS)
    assert r.exit_code == 3
    status = {row["path"]: row["status"] for row in read_images(out).to_pylist()}
    assert status["anim.gif"] == "decode_error"
    monkeypatch.undo()

    # A plain re-run has nothing to do; --retry-failed redoes the 3 stored images that failed
    # (the text file failed at pack: its bytes are not stored, so it is not retried).
    r = cli("run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS)
    assert "(0 processed now)" in r.output
    r = cli("run", dataset, "--model", analytic_model, "--out", out, "--retry-failed", *RUN_ARGS)
    assert r.exit_code == 3, r.output
    assert "(2 processed now)" in r.output  # the GIF and the truncated JPEG
    assert_same_as_baseline(out, baseline)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert sum(j.get("retry_dropped", 0) for j in journal) == 2


def _other_model(model: Path, path: Path) -> Path:
    m = onnx.load(str(model))
    m.doc_string = "the same graph, other bytes"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("change", [("--conf", "0.5"), ("--iou", "0.3"), ("--imgsz", "96"), ("--max-det", "5"),
                                    "model"])
def test_rerun_with_other_settings_is_refused(dataset, baseline, analytic_model, cli, tmp_path, change):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    model, extra = analytic_model, list(change) if change != "model" else []
    if change == "model":
        model = _other_model(analytic_model, tmp_path / "other.onnx")
    r = cli("run", dataset, "--model", model, "--out", out, *RUN_ARGS, *extra)
    assert r.exit_code == 2, r.output  # a usage error: this --out holds another run
    assert "--overwrite" in r.output
    assert_same_as_baseline(out, baseline)  # untouched


def test_overwrite_replaces_a_run_made_with_other_settings(dataset, baseline, analytic_model, cli, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    args = ["run", dataset, "--model", _other_model(analytic_model, tmp_path / "other.onnx"), "--out", out,
            *RUN_ARGS, "--conf", "0.5"]
    r = cli(*args, "--overwrite")
    assert r.exit_code == 3, r.output
    images, dets = results(out)
    expected_images, expected_dets = results(baseline)
    assert images == expected_images  # each image once: the old rows are gone, not added to
    assert dets == expected_dets  # the analytic model's scores are 1: conf 0.5 keeps them all
    r = cli(*args)
    assert r.exit_code == 3 and "(0 processed now)" in r.output  # the new settings are now this RUN_DIR's
