"""`bulkdet run --ray`: same rows as a local run, exactly once even when a worker is killed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
import ray

from conftest import make_images

from bulkdet.synthetic import compare_with_truth
from bulkdet.ingest.pack import pack
from bulkdet.run.runner import RunConfig, run
from bulkdet.store.parts import read_detections, read_images


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
    Image.new("RGB", (80, 60), (90, 90, 90)).save(root / "src" / "plain.gif")  # DALI can't: CPU fallback
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


@pytest.mark.slow
def test_ray_run_equals_local_run(ray_cluster, dataset, analytic_model, local_rows, tmp_path, cli):
    dataset_dir, truth = dataset
    out = tmp_path / "run"
    r = cli("run", dataset_dir, "--model", analytic_model, "--out", out, "--max-batch", 4, "--dali-threads", 1,
            "--infer-threads", 1, "-q", "--ray", "--workers", 2)
    assert r.exit_code == 3, r.output  # the broken file and the text file failed; the rest is ok
    images, dets = _rows(out)
    assert images == local_rows[0]
    assert dets == local_rows[1]
    assert len(images) == len({i["image_id"] for i in images}) == 43
    assert {i["path"]: i["status"] for i in images if i["status"] != "ok"} == {
        "broken.jpg": "decode_error", "notes.txt": "unsupported"}
    assert compare_with_truth(truth, dets) == []

    run_json = json.loads((out / "run.json").read_text())
    assert run_json["state"] == "complete" and run_json["totals"]["images"] == 43
    assert run_json["totals"]["fallback_decoded"] == 1  # the GIF, counted by the worker that had it
    # Both workers started; each joins when its model is loaded, so on a busy machine the first
    # can finish every shard before the second joins: 1 or 2 did the work, never more.
    ray_info = run_json["ray"]
    assert ray_info["workers_started"] == 2 and 1 <= len(ray_info["workers"]) <= 2
    assert all(w["pid"] and w["host"] for w in ray_info["workers"]) and ray_info["redone_shards"] == []
    report = cli("report", out, "--json")
    summary = json.loads(report.output)
    assert summary["images"] == 43 and summary["failed"] == 2 and summary["processed"] == 42
    assert summary["detections"] == len(dets)


@pytest.mark.slow
def test_ray_run_of_a_dataset_packed_by_reference_equals_the_local_run(ray_cluster, dataset, analytic_model,
                                                                       local_rows, tmp_path, cli):
    """Pseudo-shards (docs/inputs.md) split a reference dataset over workers as shards do."""
    ref = tmp_path / "ref"
    assert pack(dataset[0].parent / "src", ref, shard_size_mb=SHARD_MB, reference=True, quiet=True).shards >= 4
    r = cli("run", ref, "--model", analytic_model, "--out", tmp_path / "run", "--max-batch", 4, "--dali-threads", 1,
            "--infer-threads", 1, "-q", "--ray", "--workers", 2)
    assert r.exit_code == 3, r.output
    assert _rows(tmp_path / "run") == local_rows


@pytest.mark.slow
def test_ray_run_with_tiles_equals_local_run(ray_cluster, dataset, analytic_model, tmp_path, cli):
    """--tile on Ray workers: the rows of a local tiled run. The broken JPEG fails as one row,
    the GIF's tiles are cut by the Pillow fallback."""
    from bulkdet.run.tiles import TileSettings

    run(_cfg(dataset[0], analytic_model, tmp_path / "local", tiles=TileSettings(64, overlap=0.25)))
    r = cli("run", dataset[0], "--model", analytic_model, "--out", tmp_path / "ray", "--max-batch", 4,
            "--dali-threads", 1, "--infer-threads", 1, "--tile", 64, "--tile-overlap", 0.25, "-q", "--ray",
            "--workers", 2)
    assert r.exit_code == 3, r.output
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    images = {i["path"]: i for i in _rows(tmp_path / "ray")[0]}
    assert len(images) == 43 and images["broken.jpg"]["status"] == "decode_error"
    assert images["plain.gif"]["status"] == "ok"
    metrics = pq.read_table(tmp_path / "ray" / "metrics.parquet")
    assert pc.sum(metrics.column("tiles")).as_py() > 0
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["totals"]["fallback_decoded"] == 1  # the GIF, once


@pytest.mark.slow
def test_killed_worker_redoes_only_its_shard(ray_cluster, dataset, analytic_model, local_rows, tmp_path):
    """SIGKILL a worker right after its first commit: its shard is redone, the output stays exact."""
    out = tmp_path / "run"
    # One image per batch and per commit: a shard takes many commits, so the kill lands mid-shard.
    cfg = _cfg(dataset[0], analytic_model, out, commit_images=1, max_batch=1)
    killed = {}
    done = threading.Event()

    def kill_after_first_commit():
        while not done.is_set():
            parts = [p for p in (out / "images").glob("part-s*.parquet")] if (out / "images").exists() else []
            if parts:
                host, pid = _worker(parts[0]).rsplit(":", 1)
                os.kill(int(pid), signal.SIGKILL)
                killed.update(part=parts[0].name, worker=f"{host}:{pid}")
                return
            time.sleep(0.005)

    from bulkdet.run.distributed import run_on_ray

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
    live = {f"{w['host']}:{w['pid']}" for w in run_json["ray"]["workers"]}
    assert killed["worker"] not in live
    images, dets = _rows(out)
    assert images == local_rows[0]  # no row missing, none twice
    assert dets == local_rows[1]
    assert summary.images == 43
    # The killed shard's parts come from two processes: the redo kept what was committed before.
    writers = {_worker(p) for p in (out / "images").glob(f"part-s{shard:05d}-*.parquet")}
    assert killed["worker"] in writers and len(writers) == 2


def _worker(part) -> str:
    """host:pid of the worker that committed a part (from the part's key-value metadata)."""
    return pq.read_schema(part).metadata[b"bulkdet.worker"].decode()


@pytest.mark.slow
def test_ray_resume_skips_committed_shards(ray_cluster, dataset, analytic_model, local_rows, tmp_path):
    """A run that did some shards locally is finished on Ray: only the rest is processed."""
    from bulkdet.run.distributed import run_on_ray

    out = tmp_path / "run"
    first = run(_cfg(dataset[0], analytic_model, out, shards=[0, 1]))
    summary = run_on_ray(_cfg(dataset[0], analytic_model, out), workers=2)
    assert 0 < first.images < 42 and summary.processed == 42 - first.images
    images, dets = _rows(out)
    assert images == local_rows[0]
    assert dets == local_rows[1]
    ids = read_images(out, ["image_id"]).column("image_id")
    assert pc.count_distinct(ids).as_py() == len(ids)


def test_resume_shard_removes_only_that_shards_leftovers(tmp_path):
    """What a worker killed between writing a detections part and its images part leaves behind."""
    from bulkdet.run.postprocess import Detections
    from bulkdet.store.run_folder import PartWriter, RunFolder

    (tmp_path / "images").mkdir()
    (tmp_path / "detections").mkdir()
    sink = PartWriter(tmp_path, {0: "red"}, {}, commit_images=2)
    det = Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.9], np.float32), np.array([0]))
    for shard, ids in ((3, [10, 11]), (3, [12, 13]), (4, [20, 21])):
        sink.add_images(shard, ids, [f"{i}.jpg" for i in ids], [8, 8], [8, 8], ["ok", "ok"], [None, None], [det, det])
    sink.close()
    # Shard 3's third part: detections written, images part not (the kill came in between).
    committed_dets = (tmp_path / "detections" / "part-s00003-00000.parquet").read_bytes()
    for name in ("part-s00003-00002.parquet", "part-s00004-00001.parquet"):
        (tmp_path / "detections" / name).write_bytes(committed_dets)
    (tmp_path / "images" / "part-s00003-00002.parquet.tmp").write_bytes(b"torn")
    (tmp_path / "images" / "part-s00004-00001.parquet.tmp").write_bytes(b"torn")

    assert RunFolder(tmp_path).resume_shard(3) == {10, 11, 12, 13}
    assert not (tmp_path / "detections" / "part-s00003-00002.parquet").exists()
    assert not (tmp_path / "images" / "part-s00003-00002.parquet.tmp").exists()
    # Another worker's shard is left alone, even its leftovers (it may be writing them now).
    assert (tmp_path / "detections" / "part-s00004-00001.parquet").exists()
    assert (tmp_path / "images" / "part-s00004-00001.parquet.tmp").exists()
    assert sorted(p.name for p in (tmp_path / "detections").glob("part-s00003-*")) == [
        "part-s00003-00000.parquet", "part-s00003-00001.parquet"]


def test_ray_options_need_ray(tmp_path, analytic_model, cli):
    r = cli("run", tmp_path, "--model", analytic_model, "--out", tmp_path / "run", "--workers", 2)
    assert r.exit_code == 2 and "--ray" in r.output


@pytest.mark.slow
def test_a_model_error_on_a_worker_is_its_one_line(ray_cluster, dataset, analytic_model, tmp_path):
    """The engine's failure on a Ray worker reaches the driver as the same ModelRunError as a local run."""
    from test_model_errors import square_only

    from bulkdet.run.distributed import run_on_ray
    from bulkdet.run.model_errors import ModelRunError

    model = square_only(analytic_model, tmp_path / "square.onnx")
    with pytest.raises(ModelRunError) as exc:
        run_on_ray(_cfg(dataset[0], model, tmp_path / "run"), workers=1)
    assert str(exc.value).startswith("the model square.onnx failed on a batch of shape [") and "\n" not in str(exc.value)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_a_model_a_worker_cannot_load_is_the_local_runs_one_line(ray_cluster, dataset, analytic_model, tmp_path, cli):
    """A worker whose engine can't load the model: the same `error:` line and exit code as a local run,
    not Ray's "actor died" text with the worker's traceback."""
    from test_model_errors import custom_op

    model = custom_op(analytic_model, tmp_path / "custom.onnx")
    local = cli("run", dataset[0], "--model", model, "--out", tmp_path / "local", "-q")
    r = cli("run", dataset[0], "--model", model, "--out", tmp_path / "run", "-q", "--ray", "--workers", 1)
    assert local.exit_code == r.exit_code == 1, r.output
    assert r.output == local.output and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: onnxruntime could not load the model custom.onnx: ") and "Frobnicate" in r.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_ray_workers_read_an_object_store_with_the_runs_storage_options(ray_cluster, dataset, analytic_model,
                                                                        local_rows, tmp_path, cli, s3_env, request):
    """A dataset packed by reference from S3: the workers read it with the credentials given only
    by `run --storage-options` (the server accepts no other), and give the local run's rows."""
    import s3fs

    src = dataset[0].parent / "src"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_env)
    fs.mkdir("ray-data")
    for p in sorted(src.rglob("*")):
        if p.is_file():
            fs.pipe(f"ray-data/src/{p.relative_to(src)}", p.read_bytes())
    options = {"endpoint_url": s3_env, "key": "testing", "secret": "testing"}
    assert pack("s3://ray-data/src", tmp_path / "ref", shard_size_mb=SHARD_MB, reference=True, quiet=True,
                storage_options=options).shards >= 4
    key, secret = request.getfixturevalue("s3_user")  # from here on, only this key pair reads
    r = cli("run", tmp_path / "ref", "--model", analytic_model, "--out", tmp_path / "run", "--max-batch", 4,
            "--dali-threads", 1, "--infer-threads", 1, "-q", "--ray", "--workers", 2,
            "--storage-options", json.dumps({"key": key, "secret": secret}))
    assert r.exit_code == 3, r.output  # the broken file and the text file, as locally

    def by_path(rows):
        images, dets = rows
        ids = {i["image_id"]: i["path"] for i in images}
        boxes = {}
        for d in dets:
            box = (d["class_id"], *(round(d[c], 3) for c in ("x1", "y1", "x2", "y2")))
            boxes.setdefault(ids[d["image_id"]], []).append(box)
        return sorted((i["path"], i["status"]) for i in images), {p: sorted(b) for p, b in boxes.items()}

    assert by_path(_rows(tmp_path / "run")) == by_path(local_rows)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert not [p for p in written if secret.encode() in p.read_bytes()]
