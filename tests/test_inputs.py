"""Inputs where users keep them: lists of paths, tar archives, an S3 prefix on a real local
S3-compatible server (moto's server mode), and packing by reference (docs/inputs.md)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from bulkdet.ingest.pack import pack
from bulkdet.run.runner import RunConfig, run
from bulkdet.store.manifest import read_manifest
from bulkdet.store.parts import read_detections, read_images
from bulkdet.synthetic import make_demo_images


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    make_demo_images(root / "images", n=10, truth_path=root / "truth.json")
    return root / "images"


@pytest.fixture(scope="module")
def copied_run(images, analytic_model, tmp_path_factory) -> dict:
    """The folder packed by copy and run: the detections every other input must give."""
    root = tmp_path_factory.mktemp("copied")
    pack(images, root / "ds", quiet=True)
    run(RunConfig(root / "ds", analytic_model, root / "run", quiet=True))
    return detections_by_path(root / "run")


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def detections_by_path(run_dir: Path, prefix: str = "") -> dict:
    """path -> sorted boxes (class, rounded coordinates) of a finished run, `prefix` taken off paths."""
    out = {}
    for r in read_detections(run_dir).to_pylist():
        key = r["path"][len(prefix):]
        out.setdefault(key, []).append((r["class_id"], *(round(r[c], 3) for c in ("x1", "y1", "x2", "y2"))))
    return {k: sorted(v) for k, v in out.items()}


def statuses(run_dir: Path) -> dict:
    return {r["path"]: (r["status"], r["error"]) for r in read_images(run_dir, ["path", "status", "error"]).to_pylist()}


def run_dataset(ds: Path, model: Path, out: Path) -> None:
    run(RunConfig(ds, model, out, quiet=True))


# --- lists of paths -------------------------------------------------------------------------

def test_list_of_paths_packs_and_runs_to_the_same_boxes(images, copied_run, analytic_model, tmp_path, cli):
    listed = files(images)
    lst = tmp_path / "lists" / "images.txt"
    lst.parent.mkdir()
    lines = [os.path.relpath(images / p, lst.parent) for p in listed[:5]]  # relative to the list's folder
    lines += [str(images / p) for p in listed[5:]]  # absolute
    lines += ["", "missing/nowhere.jpg", lines[0], str(images)]  # blank, missing, listed twice, a folder
    lst.write_text("\n".join(lines) + "\n")
    result = cli("pack", lst, "--out", tmp_path / "ds", "--quiet")
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in read_manifest(tmp_path / "ds").to_pylist()}
    assert rows["missing/nowhere.jpg"]["status"] == "read_error" and "not found" in rows["missing/nowhere.jpg"]["error"]
    assert rows[str(images)]["status"] == "unsupported" and "folder" in rows[str(images)]["error"]
    assert sum(r["status"] == "ok" for r in read_manifest(tmp_path / "ds").to_pylist()) == len(listed)
    dup = [r for r in read_manifest(tmp_path / "ds").to_pylist() if r["path"] == lines[0]]
    assert sorted(r["status"] for r in dup) == ["ok", "unsupported"]  # one row each, the second says why
    run_dataset(tmp_path / "ds", analytic_model, tmp_path / "run")
    got = detections_by_path(tmp_path / "run")
    want = {(lines[i] if i < 5 else str(images / p)): v for i, p in enumerate(listed) for v in [copied_run.get(p)] if v}
    assert got == want
    st = statuses(tmp_path / "run")
    assert st["missing/nowhere.jpg"][0] == "read_error"


# --- tar archives ---------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = len(data), kind, 1_700_000_000
    if kind == tarfile.SYMTYPE:
        info.size, info.linkname = 0, "a.jpg"
        tar.addfile(info)
    else:
        tar.addfile(info, io.BytesIO(data))


def test_tar_archive_hostile_members(images, tmp_path, cli):
    listed = files(images)
    one, two = (images / listed[0]).read_bytes(), (images / listed[1]).read_bytes()
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "a.jpg", one)
        _add(tar, "dup.jpg", one)  # named again below: the last one is packed
        _add(tar, "../escape.jpg", one)
        _add(tar, "/etc/abs.jpg", one)
        _add(tar, "link.jpg", b"", tarfile.SYMTYPE)
        _add(tar, "dup.jpg", two)
        _add(tar, "cut.jpg", two)
    data = path.read_bytes()
    # Cut the archive inside the last member's data (and drop the end-of-archive blocks).
    with tarfile.open(path) as tar:
        cut = tar.getmember("cut.jpg")
    path.write_bytes(data[:cut.offset_data + cut.size // 2])
    result = cli("pack", path, "--out", tmp_path / "ds", "--quiet")
    assert result.exit_code == 0, result.output
    rows = read_manifest(tmp_path / "ds").to_pylist()
    by = {}
    for r in rows:
        by.setdefault(r["path"], []).append(r)
    assert by["a.jpg"][0]["status"] == "ok"
    assert [r["status"] for r in by["dup.jpg"]] == ["unsupported", "ok"]
    assert "named again" in by["dup.jpg"][0]["error"]
    assert by["dup.jpg"][1]["width"] > 0 and by["dup.jpg"][1]["bytes"] == len(two)  # the last one's bytes
    for name in ("../escape.jpg", "/etc/abs.jpg"):
        assert by[name][0]["status"] == "unsupported" and "escapes" in by[name][0]["error"]
    assert by["link.jpg"][0]["status"] == "unsupported" and "link" in by["link.jpg"][0]["error"]
    assert by["cut.jpg"][0]["status"] == "read_error" and "ends inside" in by["cut.jpg"][0]["error"]
    # Re-pack: every row is matched (duplicate names in order), nothing new.
    assert cli("pack", path, "--out", tmp_path / "ds", "--quiet").exit_code == 0
    again = read_manifest(tmp_path / "ds").to_pylist()
    assert [(r["image_id"], r["status"]) for r in again] == [(r["image_id"], r["status"]) for r in rows]


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_tar_runs_to_the_same_boxes(images, copied_run, analytic_model, tmp_path, cli, suffix, mode):
    path = tmp_path / f"images{suffix}"
    with tarfile.open(path, mode) as tar:
        tar.add(images, arcname="images")
    result = cli("pack", path, "--out", tmp_path / "ds", "--quiet")
    assert result.exit_code == 0, result.output
    run_dataset(tmp_path / "ds", analytic_model, tmp_path / "run")
    assert detections_by_path(tmp_path / "run", "images/") == copied_run
    if suffix == ".tar":  # by reference: read at each member's offset
        assert cli("pack", path, "--out", tmp_path / "ref", "--reference", "--quiet").exit_code == 0
        run_dataset(tmp_path / "ref", analytic_model, tmp_path / "run-ref")
        assert detections_by_path(tmp_path / "run-ref", "images/") == copied_run
    else:  # a gzip stream can't be read at an offset: refused, with what to do
        result = cli("pack", path, "--out", tmp_path / "ref", "--reference")
        assert result.exit_code == 2 and "error: --reference needs an uncompressed tar" in result.output


# --- packing by reference -------------------------------------------------------------------

def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_reference_changed_and_deleted_sources_are_flagged(images, copied_run, analytic_model, tmp_path, cli):
    src = tmp_path / "src"
    shutil.copytree(images, src)
    result = cli("pack", src, "--out", tmp_path / "ds", "--reference", "--shard-size-mb", "0.1", "--quiet")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ds" / "shards").exists()  # no image bytes stored
    assert _size(tmp_path / "ds") < _size(src) / 5
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["reference"] is True and info["source_kind"] == "directory" and info["source"] == str(src.resolve())
    shards = set(read_manifest(tmp_path / "ds").column("shard").to_pylist())
    assert len(shards) > 1  # pseudo-shards of bounded source bytes: the unit of work and resume
    listed = files(src)
    changed, deleted = listed[0], listed[1]
    other = (src / listed[2]).read_bytes()
    (src / changed).write_bytes(other)  # another image's bytes: detections would be wrong
    (src / deleted).unlink()
    run_dataset(tmp_path / "ds", analytic_model, tmp_path / "run")
    st = statuses(tmp_path / "run")
    assert st[changed][0] == "changed" and "changed since pack" in st[changed][1]
    assert st[deleted][0] == "read_error" and "gone" in st[deleted][1]
    got = detections_by_path(tmp_path / "run")
    assert changed not in got and deleted not in got
    assert got == {p: v for p, v in copied_run.items() if p not in (changed, deleted)}
    # A dataset keeps its way of packing and its source.
    result = cli("pack", src, "--out", tmp_path / "ds")
    assert result.exit_code == 2 and "was packed by reference" in result.output


def test_reference_repack_sees_changes(images, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(images, src)
    pack(src, tmp_path / "ds", reference=True, quiet=True)
    s = pack(src, tmp_path / "ds", reference=True, quiet=True)
    assert (s.unchanged, s.new, s.changed) == (len(files(src)), 0, 0)
    target = src / files(src)[0]
    target.write_bytes((src / files(src)[3]).read_bytes())
    s = pack(src, tmp_path / "ds", reference=True, quiet=True)
    assert s.changed == 1


# --- object stores: a real S3-compatible server on 127.0.0.1 ----------------------------------

def _upload(images: Path, endpoint: str, bucket: str, only: list[str] | None = None) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    fs.mkdir(bucket)
    for p in only or files(images):
        fs.pipe(f"{bucket}/camera/{p}", (images / p).read_bytes())


def test_s3_prefix_from_environment_and_storage_options(images, copied_run, analytic_model, tmp_path, cli, s3_env,
                                                        monkeypatch):
    _upload(images, s3_env, "traps")
    # Endpoint and credentials from the environment variables.
    result = cli("pack", "s3://traps/camera", "--out", tmp_path / "ds", "--quiet")
    assert result.exit_code == 0, result.output
    run_dataset(tmp_path / "ds", analytic_model, tmp_path / "run")
    assert detections_by_path(tmp_path / "run") == copied_run
    # By reference, the endpoint from --storage-options (not the environment); the run reads the
    # objects back with the endpoint dataset.json kept and the credentials from the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = json.dumps({"endpoint_url": s3_env, "key": "testing", "secret": "testing"})
    result = cli("pack", "s3://traps/camera", "--out", tmp_path / "ref", "--reference", "--storage-options", options,
                 "--quiet")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "ref" / "dataset.json").read_text())
    assert info["storage_options"] == {"endpoint_url": s3_env}  # never the credentials
    run_dataset(tmp_path / "ref", analytic_model, tmp_path / "run-ref")
    assert detections_by_path(tmp_path / "run-ref") == copied_run
    # An object overwritten after pack: flagged, never detected.
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_env)
    name = files(images)[0]
    fs.pipe(f"traps/camera/{name}", (images / files(images)[2]).read_bytes())
    gone = files(images)[1]
    fs.rm(f"traps/camera/{gone}")
    run_dataset(tmp_path / "ref", analytic_model, tmp_path / "run-ref2")
    st = statuses(tmp_path / "run-ref2")
    assert st[name][0] == "changed" and st[gone][0] == "read_error"
    assert detections_by_path(tmp_path / "run-ref2") == {p: v for p, v in copied_run.items() if p not in (name, gone)}


def test_url_errors_are_one_line(tmp_path, cli, s3_env):
    result = cli("pack", "gs://bucket/prefix", "--out", tmp_path / "ds")  # gcsfs is not installed here
    assert result.exit_code == 2 and "bulkdet[gcs]" in result.output and "Traceback" not in result.output
    result = cli("pack", "s3://no-such-bucket/x", "--out", tmp_path / "ds2")
    assert result.exit_code == 1 and result.output == (
        "error: cannot list s3://no-such-bucket/x: FileNotFoundError: The specified bucket does not exist\n")
    result = cli("pack", "s3://b/x", "--out", tmp_path / "ds3", "--storage-options", "{not json")
    assert result.exit_code == 2 and "--storage-options" in result.output


def test_crops_and_html_report_read_a_reference_dataset(images, analytic_model, tmp_path, cli):
    """Everything that reads a dataset's bytes after the run reads them from the source too."""
    import base64
    import re

    import pyarrow.parquet as pq

    assert cli("pack", images, "--out", tmp_path / "ds", "--reference", "-q").exit_code == 0
    run_dataset(tmp_path / "ds", analytic_model, tmp_path / "run")
    r = cli("crops", tmp_path / "run", "--out", tmp_path / "crops", "-q")
    assert r.exit_code == 0, r.output
    index = pq.read_table(tmp_path / "crops" / "crops.parquet").to_pylist()
    assert len(index) == len(read_detections(tmp_path / "run")) > 0
    assert all((tmp_path / "crops" / c["crop_path"]).stat().st_size > 0 for c in index)
    r = cli("report", tmp_path / "run", "--html", tmp_path / "report.html")
    assert r.exit_code == 0, r.output
    samples = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', (tmp_path / "report.html").read_text())
    assert len(samples) == 6 and all(base64.b64decode(s)[:2] == b"\xff\xd8" for s in samples)
    # --storage-options is for a dataset read from an object store only (refused as by `run`).
    for args, out in ((("crops", tmp_path / "run", "--out", tmp_path / "c2"), tmp_path / "c2"),
                      (("report", tmp_path / "run", "--html", tmp_path / "r2.html"), tmp_path / "r2.html")):
        r = cli(*args, "--storage-options", '{"anon": true}')
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert "reads no object store" in r.output and not out.exists()
        r = cli(*args, "--storage-options", "[1]")
        assert r.exit_code == 2 and r.output.startswith("error: invalid value for '--storage-options': give a JSON "
                                                        "object"), r.output
    r = cli("report", tmp_path / "run", "--storage-options", '{"anon": true}')  # no --html: nothing reads the dataset
    assert r.exit_code == 2 and "give --html too" in r.output and r.output.count("\n") == 1, r.output


def test_run_storage_options_give_the_credentials_and_are_written_nowhere(images, copied_run, analytic_model,
                                                                          tmp_path, cli, s3_env, request, monkeypatch):
    """A dataset packed by reference from S3, run with credentials given only by `run --storage-options`."""
    _upload(images, s3_env, "creds")
    result = cli("pack", "s3://creds/camera", "--out", tmp_path / "ref", "--reference", "-q")
    assert result.exit_code == 0, result.output
    key, secret = request.getfixturevalue("s3_user")  # the server checks credentials from here on
    # The environment's credentials are now wrong (not a user of the server); then there are none.
    result = cli("run", tmp_path / "ref", "--model", analytic_model, "--out", tmp_path / "wrong", "-q")
    assert result.exit_code == 3, result.output  # the objects can't be read: every row a read_error
    assert {s for s, _ in statuses(tmp_path / "wrong").values()} == {"read_error"}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = cli("run", tmp_path / "ref", "--model", analytic_model, "--out", tmp_path / "none", "-q")
    assert result.exit_code == 3, result.output
    assert {s for s, _ in statuses(tmp_path / "none").values()} == {"read_error"}

    options = json.dumps({"key": key, "secret": secret})
    result = cli("run", tmp_path / "ref", "--model", analytic_model, "--out", tmp_path / "run", "-q",
                 "--storage-options", options)
    assert result.exit_code == 0, result.output
    assert detections_by_path(tmp_path / "run") == copied_run
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(written) > 4 and not [p for p in written if secret.encode() in p.read_bytes()]
    assert "storage_options" not in json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    # The options are no setting of the run: resumed without them (nothing left to read), not refused.
    result = cli("run", tmp_path / "ref", "--model", analytic_model, "--out", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output

    for bad, says in (("{not json", "not JSON: "), ("[1]", "give a JSON object")):
        result = cli("run", tmp_path / "ref", "--model", analytic_model, "--out", tmp_path / "r2",
                     "--storage-options", bad)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: invalid value for '--storage-options': {says}"), result.output
        assert not (tmp_path / "r2").exists()


def test_crops_and_html_report_take_the_credentials_from_storage_options(images, analytic_model, tmp_path, cli, s3_env,
                                                                         request, monkeypatch):
    """crops and report --html read a dataset packed by reference from S3 with credentials given
    only by their --storage-options; without them the images can't be read, as any unreadable image."""
    import re

    import pyarrow.parquet as pq
    import s3fs

    small = ["img_000.jpg", "img_001.jpg", "img_002.jpg", "img_007.png", "set_a/img_008.jpg",
             "set_b/deeper/img_009.jpg"]  # 0.9 MB
    _upload(images, s3_env, "thumbs", small)
    assert cli("pack", "s3://thumbs/camera", "--out", tmp_path / "ref", "--reference", "-q").exit_code == 0
    run_dataset(tmp_path / "ref", analytic_model, tmp_path / "run")
    detections = len(read_detections(tmp_path / "run"))
    assert detections > 0 and len(read_images(tmp_path / "run")) == len(small)
    key, secret = request.getfixturevalue("s3_user")  # the server checks credentials from here on

    def unreadable(tag: str) -> None:
        r = cli("crops", tmp_path / "run", "--out", tmp_path / f"crops-{tag}", "-q")
        assert r.exit_code == 3 and f"{len(small)} image(s) could not be read" in r.output, r.output
        assert not list((tmp_path / f"crops-{tag}").rglob("*.jpg"))
        r = cli("report", tmp_path / "run", "--html", tmp_path / f"{tag}.html")
        assert r.exit_code == 0, r.output
        page = (tmp_path / f"{tag}.html").read_text()
        assert "data:image/jpeg" not in page and page.count("not read (read_error: ") == len(small)

    unreadable("wrong")  # the environment's credentials are no user of the server
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # not the file system made with the environment's keys
    unreadable("none")

    options = json.dumps({"key": key, "secret": secret})
    r = cli("crops", tmp_path / "run", "--out", tmp_path / "crops", "-q", "--storage-options", options)
    assert r.exit_code == 0, r.output
    index = pq.read_table(tmp_path / "crops" / "crops.parquet").to_pylist()
    assert len(index) == detections and all((tmp_path / "crops" / c["crop_path"]).stat().st_size > 0 for c in index)
    r = cli("report", tmp_path / "run", "--html", tmp_path / "report.html", "--storage-options", options)
    assert r.exit_code == 0, r.output
    assert len(re.findall(r'src="data:image/jpeg;base64,', (tmp_path / "report.html").read_text())) == len(small)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if secret.encode() in p.read_bytes() or key.encode() in p.read_bytes()]


def test_run_storage_options_for_a_dataset_read_from_no_object_store_are_refused(images, analytic_model, tmp_path,
                                                                               cli):
    assert cli("pack", images, "--out", tmp_path / "ds", "--reference", "-q").exit_code == 0
    result = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run",
                 "--storage-options", '{"anon": true}')
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "reads no object store" in result.output and not (tmp_path / "run").exists()
