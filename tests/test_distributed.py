"""`bulkdet run --ray`: same rows as a local run, exactly once even when a worker is killed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pyarrow.compute as pc
import pytest
import ray

from conftest import make_images

from bulkdet.demo import compare_with_truth
from bulkdet.pack import pack
from bulkdet.runner import RunConfig, run
from bulkdet.sink import read_detections, read_images


SHARD_MB = 0.12  # about 8 images per shard: 5 shards from 40 images


@pytest.fixture(scope="module")
def ray_cluster():
    """A small local cluster: 2 CPUs, no dashboard, no usage stats; shut down after the module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """~40 small images (JPEG/PNG, some EXIF-rotated), one broken JPEG and one non-image, in several shards."""
    root = tmp_path_factory.mktemp("ray-data")
    specs = [(f"d{i % 3}/img{i:03d}.{'png' if i % 4 == 0 else 'jpg'}", 96 + 8 * (i % 7), 64 + 8 * (i % 5),
              "png" if i % 4 == 0 else "jpeg", 6 if i % 5 == 0 else 1) for i in range(40)]
    truth = make_images(root / "src", specs)
    good = (root / "src" / specs[1][0]).read_bytes()
    (root / "src" / "broken.jpg").write_bytes(good[: len(good) // 3])  # decodes to an error
    (root / "src" / "notes.txt").write_text("not an image")  # fails at pack: never stored
    summary = pack(root / "src", root / "ds", shard_size_mb=SHARD_MB, quiet=True)
    assert summary.shards >= 4
    return root / "ds", truth


def _cfg(dataset_dir, model, out, max_batch=4, **kw) -> RunConfig:
    # One thread each, in both runs, so float sums happen in the same order: rows compare exactly.
    return RunConfig(dataset_dir, model, out, max_batch=max_batch, dali_threads=1, infer_threads=1, quiet=True, **kw)


def _rows(run_dir):
    images = read_images(run_dir).sort_by("image_id").to_pylist()
    dets = read_detections(run_dir).to_pylist()
    dets.sort(key=lambda d: (d["image_id"], d["class_id"], d["x1"], d["y1"], d["score"]))
    return images, dets


@pytest.fixture(scope="module")
def local_rows(dataset, analytic_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    run(_cfg(dataset[0], analytic_model, out))
    return _rows(out)


def test_ray_run_equals_local_run(ray_cluster, dataset, analytic_model, local_rows, tmp_path, cli):
    dataset_dir, truth = dataset
    out = tmp_path / "run"
    r = cli("run", dataset_dir, "--model", analytic_model, "--out", out, "--max-batch", 4, "--dali-threads", 1,
            "--infer-threads", 1, "-q", "--ray", "--workers", 2)
    assert r.exit_code == 3, r.output  # the broken file and the text file failed; the rest is ok
    images, dets = _rows(out)
    assert images == local_rows[0]
    assert dets == local_rows[1]
    assert len(images) == len({i["image_id"] for i in images}) == 42
    assert {i["path"]: i["status"] for i in images if i["status"] != "ok"} == {
        "broken.jpg": "decode_error", "notes.txt": "unsupported"}
    assert compare_with_truth(truth, dets) == []

    run_json = json.loads((out / "run.json").read_text())
    assert run_json["state"] == "complete" and run_json["totals"]["images"] == 42
    assert len(run_json["ray"]["workers"]) == 2 and run_json["ray"]["redone_shards"] == []
    report = cli("report", out, "--json")
    summary = json.loads(report.output)
    assert summary["images"] == 42 and summary["failed"] == 2 and summary["processed"] == 41
    assert summary["detections"] == len(dets)


def test_killed_worker_redoes_only_its_shard(ray_cluster, dataset, analytic_model, local_rows, tmp_path):
    """SIGKILL a worker right after its first commit: its shard is redone, the output stays exact."""
    out = tmp_path / "run"
    # One image per batch and per commit: a shard takes many commits, so the kill lands mid-shard.
    cfg = _cfg(dataset[0], analytic_model, out, commit_images=1, max_batch=1)
    killed = {}
    done = threading.Event()

    def kill_after_first_commit():
        journal = out / "journal.jsonl"
        while not done.is_set():
            lines = journal.read_text().splitlines() if journal.exists() else []
            first = next((json.loads(ln) for ln in lines if "unstored" not in ln), None)
            if first:
                os.kill(first["pid"], signal.SIGKILL)
                killed.update(first)
                return
            time.sleep(0.005)

    from bulkdet.distributed import run_on_ray

    killer = threading.Thread(target=kill_after_first_commit)
    killer.start()
    try:
        summary = run_on_ray(cfg, workers=2)
    finally:
        done.set()
        killer.join()

    assert killed, "no worker committed a part"
    shard = int(killed["part"].split("-")[1][1:])
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["ray"]["redone_shards"] == [shard]
    assert killed["pid"] not in {w["pid"] for w in run_json["ray"]["workers"]}
    images, dets = _rows(out)
    assert images == local_rows[0]  # no row missing, none twice
    assert dets == local_rows[1]
    assert summary.images == 42
    # The killed shard's parts come from two processes: the redo kept what was committed before.
    pids = {json.loads(ln)["pid"] for ln in (out / "journal.jsonl").read_text().splitlines()
            if f"part-s{shard:05d}-" in ln}
    assert killed["pid"] in pids


def test_ray_resume_skips_committed_shards(ray_cluster, dataset, analytic_model, local_rows, tmp_path):
    """A run that did some shards locally is finished on Ray: only the rest is processed."""
    from bulkdet.distributed import run_on_ray

    out = tmp_path / "run"
    first = run(_cfg(dataset[0], analytic_model, out, shards=[0, 1]))
    summary = run_on_ray(_cfg(dataset[0], analytic_model, out), workers=2)
    assert 0 < first.images < 41 and summary.processed == 41 - first.images
    images, dets = _rows(out)
    assert images == local_rows[0]
    assert dets == local_rows[1]
    ids = read_images(out, ["image_id"]).column("image_id")
    assert pc.count_distinct(ids).as_py() == len(ids)
