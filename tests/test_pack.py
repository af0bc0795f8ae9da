import os

import lmdb
import pyarrow.parquet as pq

from bulkdet.ingest.pack import pack
from bulkdet.store.shards import existing_shards, shard_path
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


def test_symlinks_recorded_not_followed_by_default(tmp_path):
    src = tmp_path / "src"
    make_images(src, [("a.jpg", 100, 100, "jpeg", 1)])
    os.symlink(src / "a.jpg", src / "link.jpg")
    os.symlink(src, src / "loop")
    rows = manifest_rows(pack(src, tmp_path / "ds", quiet=True) and tmp_path / "ds")
    assert rows["link.jpg"]["status"] == "skipped" and rows["loop"]["status"] == "skipped"
    rows = manifest_rows(pack(src, tmp_path / "ds2", follow_symlinks=True, quiet=True) and tmp_path / "ds2")
    assert rows["link.jpg"]["status"] == "ok"
    assert rows["loop"]["status"] == "skipped" and "loop" in rows["loop"]["error"]
