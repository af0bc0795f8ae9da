import hashlib
import os
import shutil

import lmdb
import pyarrow.parquet as pq

from bulkdet.ingest.pack import pack
from bulkdet.store.manifest import processed, read_manifest
from bulkdet.store.shards import existing_shards, shard_path
from bulkdet.store.parts import read_images
from conftest import make_images


def manifest_rows(ds):
    return {r["path"]: r for r in pq.read_table(ds / "manifest.parquet").to_pylist()}


def test_pack_stores_bytes_unchanged_and_writes_manifest(tmp_path):
    src = tmp_path / "src"
    make_images(src, [("a.jpg", 120, 80, "jpeg", 6), ("sub/b.png", 64, 64, "png", 1)])
    (src / "notes.txt").write_text("not an image")
    summary = pack(src, tmp_path / "ds", quiet=True)
    rows = manifest_rows(tmp_path / "ds")
    assert set(rows) == {"a.jpg", "sub/b.png", "notes.txt"}
    a = rows["a.jpg"]
    assert (a["format"], a["width"], a["height"], a["orientation"], a["status"]) == ("jpeg", 120, 80, 6, "ok")  # upright size
    env = lmdb.open(str(shard_path(tmp_path / "ds" / "shards", a["shard"])), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(a["key"]) == (src / "a.jpg").read_bytes()
    assert rows["notes.txt"]["status"] == "unsupported" and rows["notes.txt"]["shard"] == -1
    assert summary.by_status == {"ok": 2, "unsupported": 1}
    assert sorted(r["image_id"] for r in rows.values()) == [0, 1, 2]


def test_repack_adds_only_new_files(tmp_path):
    src = tmp_path / "src"
    make_images(src, [("a.jpg", 100, 100, "jpeg", 1)])
    pack(src, tmp_path / "ds", quiet=True)
    first = manifest_rows(tmp_path / "ds")
    make_images(src, [("b.jpg", 90, 100, "jpeg", 1)], seed=1)
    summary = pack(src, tmp_path / "ds", quiet=True)
    rows = manifest_rows(tmp_path / "ds")
    assert summary.new == 1 and set(rows) == {"a.jpg", "b.jpg"}
    assert rows["a.jpg"] == first["a.jpg"]  # unchanged, same id
    assert rows["b.jpg"]["image_id"] == 1


def test_duplicate_content_stored_once_both_paths_listed(tmp_path):
    src = tmp_path / "src"
    make_images(src, [("a.jpg", 100, 100, "jpeg", 1)])
    (src / "copy").mkdir()
    (src / "copy" / "a.jpg").write_bytes((src / "a.jpg").read_bytes())
    summary = pack(src, tmp_path / "ds", quiet=True)
    rows = manifest_rows(tmp_path / "ds")
    assert rows["a.jpg"]["key"] == rows["copy/a.jpg"]["key"]
    assert summary.duplicates == 1 and summary.stored_bytes == (src / "a.jpg").stat().st_size


def test_shards_roll_over_at_size(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        (src).mkdir(exist_ok=True)
        (src / f"{i}.bin").write_bytes(os.urandom(10))  # unsupported, not stored
    make_images(src, [(f"img{i}.png", 400, 400, "png", 1) for i in range(4)])
    pack(src, tmp_path / "ds", shard_size_mb=1, quiet=True)
    rows = manifest_rows(tmp_path / "ds")
    sizes = [r["bytes"] for r in rows.values() if r["status"] == "ok"]
    assert sum(sizes) > 1 << 20  # the data really needs more than one shard
    assert len(existing_shards(tmp_path / "ds" / "shards")) >= 2


def test_links_to_files_are_read_folders_are_never_rows(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    make_images(src, [("a.jpg", 100, 100, "jpeg", 1)])
    make_images(outside, [("o.png", 60, 40, "png", 1)], seed=1)
    os.symlink(src / "a.jpg", src / "link.jpg")
    os.symlink("missing.jpg", src / "dangling.jpg")
    os.symlink(src, src / "loop")
    os.symlink(outside, src / "elsewhere")
    rows = manifest_rows(pack(src, tmp_path / "ds", quiet=True) and tmp_path / "ds")
    # Default: the link to a file is the file (its target's bytes, stored once); no folder row.
    assert set(rows) == {"a.jpg", "link.jpg", "dangling.jpg"}
    assert rows["link.jpg"]["status"] == "ok" and rows["link.jpg"]["key"] == rows["a.jpg"]["key"]
    assert rows["dangling.jpg"]["status"] == "read_error" and "dangling" in rows["dangling.jpg"]["error"]
    # --follow-symlinks walks the linked folder; the loop back to src is not walked again.
    summary = pack(src, tmp_path / "ds2", follow_symlinks=True, quiet=True)
    rows = manifest_rows(tmp_path / "ds2")
    assert set(rows) == {"a.jpg", "link.jpg", "dangling.jpg", "elsewhere/o.png"}
    assert rows["elsewhere/o.png"]["status"] == "ok" and summary.notes.folder_links == []


def test_repack_detects_changed_deleted_and_renamed_files(tmp_path, cli):
    src = tmp_path / "src"
    make_images(src, [(f"{n}.jpg", 100, 80, "jpeg", 1) for n in "abcde"])
    assert cli("pack", src, "--out", tmp_path / "ds", "-q").exit_code == 0
    first = manifest_rows(tmp_path / "ds")
    make_images(src, [("a.jpg", 100, 80, "jpeg", 1)], seed=7)  # new content under the same name
    (src / "b.jpg").unlink()
    (src / "c.jpg").rename(src / "c2.jpg")
    os.utime(src / "d.jpg", ns=(1, 1))  # touched: same bytes, another mtime
    r = cli("pack", src, "--out", tmp_path / "ds", "-q")
    assert r.exit_code == 0, r.output
    assert "packed 1 new files" in r.output and "1 changed (new rows), 2 deleted (1 renamed), 2 unchanged" in r.output
    rows = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()
    by_id = {row["image_id"]: row for row in rows}
    assert all(by_id[row["image_id"]]["path"] == row["path"] for row in first.values())  # ids stay stable
    assert by_id[first["a.jpg"]["image_id"]]["status"] == "replaced"
    (new_a,) = [row for row in rows if row["path"] == "a.jpg" and row["status"] == "ok"]
    assert new_a["image_id"] == 5 and new_a["key"] == hashlib.sha256((src / "a.jpg").read_bytes()).digest()
    assert by_id[first["b.jpg"]["image_id"]]["status"] == "deleted"
    c = by_id[first["c.jpg"]["image_id"]]
    assert c["status"] == "deleted" and "now c2.jpg (image_id 6)" in c["error"]
    assert by_id[first["d.jpg"]["image_id"]]["status"] == "ok"
    assert by_id[first["d.jpg"]["image_id"]]["mtime_ns"] == 1  # remembered: the next pack does not read it
    # What a run processes: the current files once each, changed ones under their new id.
    current = processed(read_manifest(tmp_path / "ds"))
    assert sorted(current.column("path").to_pylist()) == ["a.jpg", "c2.jpg", "d.jpg", "e.jpg"]
    assert 5 in current.column("image_id").to_pylist()
    r = cli("pack", src, "--out", tmp_path / "ds", "-q")  # nothing changed since
    assert "0 changed (new rows), 0 deleted, 4 unchanged" in r.output and "packed 0 new files" in r.output


def test_a_run_after_repack_processes_changed_files_and_gives_retired_rows_no_row(tmp_path, analytic_model, cli):
    src = tmp_path / "src"
    make_images(src, [(f"{n}.jpg", 96, 64, "jpeg", 1) for n in "abc"])
    cli("pack", src, "--out", tmp_path / "ds", "-q")
    args = ("--model", analytic_model, "--imgsz", 128, "-q")
    assert cli("run", tmp_path / "ds", "--out", tmp_path / "run", *args).exit_code == 0
    make_images(src, [("a.jpg", 96, 64, "jpeg", 1)], seed=9)
    (src / "b.jpg").unlink()
    cli("pack", src, "--out", tmp_path / "ds", "-q")
    r = cli("run", tmp_path / "ds", "--out", tmp_path / "run", *args)  # resumed: the new a.jpg only
    assert r.exit_code == 0 and "(1 processed now)" in r.output, r.output
    r = cli("run", tmp_path / "ds", "--out", tmp_path / "fresh", *args)
    assert r.exit_code == 0, r.output
    rows = read_images(tmp_path / "fresh").to_pylist()
    assert sorted((row["path"], row["image_id"], row["status"]) for row in rows) == [
        ("a.jpg", 3, "ok"), ("c.jpg", 2, "ok")]


def test_repack_of_another_source_mirrors_it_and_says_so(tmp_path, cli):
    one, two = tmp_path / "one", tmp_path / "two"
    make_images(one, [(f"{i}.jpg", 64, 64, "jpeg", 1) for i in range(4)])
    make_images(two, [(f"{i}.jpg", 64, 64, "jpeg", 1) for i in range(2, 6)], seed=3)  # 2, 3 overlap
    shutil.copy2(one / "2.jpg", two / "2.jpg")  # the same file (bytes and mtime) in both
    cli("pack", one, "--out", tmp_path / "ds", "-q")
    r = cli("pack", two, "--out", tmp_path / "ds", "-q")
    assert r.exit_code == 0, r.output
    assert f"the last pack into {tmp_path / 'ds'} read {one}" in r.output
    assert "packed 2 new files" in r.output and "1 changed (new rows), 2 deleted, 1 unchanged" in r.output
    current = processed(read_manifest(tmp_path / "ds")).to_pylist()
    assert {row["path"]: row["key"] for row in current} == {
        p.name: hashlib.sha256(p.read_bytes()).digest() for p in two.iterdir()}


def test_manifest_written_before_mtimes_still_reads_and_repacks(tmp_path):
    src = tmp_path / "src"
    make_images(src, [("a.jpg", 50, 50, "jpeg", 1), ("b.png", 40, 30, "png", 1)])
    pack(src, tmp_path / "ds", quiet=True)
    path = tmp_path / "ds" / "manifest.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["mtime_ns"]), path)  # as an older bulkdet wrote it
    assert read_manifest(tmp_path / "ds").column("mtime_ns").null_count == 2
    summary = pack(src, tmp_path / "ds", quiet=True)  # re-read, same hashes: same rows
    assert (summary.new, summary.changed, summary.unchanged) == (0, 0, 2)
    assert read_manifest(tmp_path / "ds").column("mtime_ns").null_count == 0


def test_pack_into_its_own_source_twice_packs_only_the_images(tmp_path, cli):
    src = tmp_path / "src"
    make_images(src, [("a.jpg", 60, 60, "jpeg", 1), ("sub/b.png", 50, 40, "png", 1)])
    (src / "old_run").mkdir()  # a run folder of an older bulkdet (no lock file): not images either
    for name in ("run.json", "fingerprint.json"):
        (src / "old_run" / name).write_text("{}")
    (src / "notes").mkdir()  # one marker alone is a user's file: packed
    (src / "notes" / "run.json").write_text("{}")
    for _ in range(2):
        r = cli("pack", src, "--out", src / "ds", "-q")
        assert r.exit_code == 0, r.output
        assert "bulkdet folders not packed: ds, old_run" in r.output
    assert set(manifest_rows(src / "ds")) == {"a.jpg", "sub/b.png", "notes/run.json"}
    r = cli("pack", src, "--out", src, "-q")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "is the source folder itself" in r.output
