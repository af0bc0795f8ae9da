"""Exactly-once output: kill -9 at random moments, resume, and get what an uninterrupted run gets.

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
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bulkdet.demo import draw_upright, random_rects
from bulkdet.ingest.pack import pack
from bulkdet.run.runner import RunConfig, run
from bulkdet.store.parts import prepare_run_dir, read_detections, read_images
from conftest import RUNNER_STATUS_RULES_TODO, ROOT, make_images

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


def _journal_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "journal.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _committed_images(run_dir: Path) -> int:
    try:
        return sum(json.loads(line)["images"] for line in (run_dir / "journal.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _start_run(dataset, model, out) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "bulkdet", "run", dataset, "--model", model, "--out", out,
                             *map(str, RUN_ARGS)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_9_at_random_moments_then_resume_gives_identical_output(dataset, baseline, analytic_model, cli,
                                                                     tmp_path):
    seed = int(os.environ.get("BULKDET_KILL_SEED", time.time_ns() % 100_000))
    rng = np.random.default_rng(seed)
    out = tmp_path / "run"
    kills = []  # (how the moment was chosen, parts committed when killed)
    for _ in range(8):
        if len(kills) == 5:
            break
        proc = _start_run(dataset, analytic_model, out)
        committed = _journal_lines(out)
        # Waiting for commits needs work left for the kills still to come; near the end, kill
        # during start-up instead (imports alone take longer than 0.3 s), so all kills land.
        work_left = N_GOOD - _committed_images(out) > 8
        if not work_left:
            time.sleep(rng.uniform(0, 0.3))
            how = "start-up"
        elif rng.random() < 0.25:  # any moment from start-up on (imports, set-up, first batches)
            time.sleep(rng.uniform(0, 1.0))
            how = "time"
        else:  # after 1..3 more commits, then 0..10 ms more: between or inside commits
            target = committed + int(rng.integers(1, 4))
            while proc.poll() is None and _journal_lines(out) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.01))
            how = "commits"
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((how, _journal_lines(out)))
        # A reader sees only complete parts, each image at most once, even right after a kill.
        if (out / "images").exists():
            ids = [i for p in sorted((out / "images").glob("*.parquet"))
                   for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist()]
            assert len(ids) == len(set(ids)), f"seed {seed}: duplicate rows after kill {len(kills)}"
            for p in (out / "detections").glob("*.parquet"):
                pq.read_table(p)
    assert len(kills) >= 5, f"seed {seed}: only {len(kills)} kills landed before the run finished: {kills}"

    r = cli("run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS)
    assert r.exit_code == 3, r.output  # finished; the truncated JPEG and the text file failed
    assert_same_as_baseline(out, baseline)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert {j["part"] for j in journal} == {p.name for p in (out / "images").glob("*.parquet")}, seed


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
    done = prepare_run_dir(out, json.loads((out / "fingerprint.json").read_text()), overwrite=False)
    assert not (out / "detections" / last.name).exists() and not list(out.rglob("*.tmp"))
    assert done == {r["image_id"] for r in results(baseline)[0]} - lost_ids

    r = cli("run", dataset, "--model", analytic_model, "--out", out, *RUN_ARGS)
    assert r.exit_code == 3, r.output
    assert f"({lost} processed now)" in r.output
    assert_same_as_baseline(out, baseline)
    lines = (out / "journal.jsonl").read_text().splitlines()
    parts = {json.loads(line)["part"] for line in lines if line.startswith("{") and line.endswith("}")}
    assert parts == {p.name for p in (out / "images").glob("*.parquet")}


@RUNNER_STATUS_RULES_TODO
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
