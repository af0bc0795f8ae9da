"""pack under faults: LMDB map growth, kill -9 mid-pack, duplicate contents, broken shard files."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import lmdb
import numpy as np
import pytest
from PIL import Image

from bulkdet.ingest.pack import pack
from bulkdet.store.manifest import read_manifest
from bulkdet.store.shards import ShardReader, ShardWriter, existing_shards, shard_keys
from conftest import ROOT


def _values(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, np.uint8).tobytes() for _ in range(n)]


def test_map_full_grows_the_map_and_replays_the_transaction(tmp_path):
    values = _values(40, 20_000) + _values(1, 1 << 20, seed=1)  # the last one alone is 16x the map
    keys = [hashlib.sha256(v).digest() for v in values]
    writer = ShardWriter(tmp_path, 0, shard_bytes=1 << 30, txn_bytes=200_000, initial_map_bytes=64 << 10)
    for key, value in zip(keys, values):
        assert writer.put(key, value) == 0
    writer.close()
    assert writer.map_growths >= 5  # 64 KiB -> >= 2 MiB
    reader = ShardReader(tmp_path)
    assert reader.get_many(0, keys) == values  # nothing lost in the aborted transactions
    reader.close()


def _jpeg_with_tail(rng, tail: int) -> bytes:
    """A valid small JPEG followed by random bytes (after its end marker): unique, ~`tail` bytes."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue() + rng.integers(0, 256, tail, np.uint8).tobytes()


def _check_shards(shards_dir) -> dict[bytes, int]:
    """Every committed value is intact (its key is its sha256); returns key -> shard."""
    where = {}
    for shard, path in existing_shards(shards_dir).items():
        if path.stat().st_size == 0:
            continue  # created by a pack killed before its first write: holds nothing
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            for key, value in txn.cursor():
                assert hashlib.sha256(value).digest() == key, f"corrupt value in {path}"
                assert key not in where, "the same content stored twice"
                where[bytes(key)] = shard
        env.close()
    return where


@pytest.mark.slow
def test_kill_9_during_pack_keeps_committed_shards_and_a_rerun_completes(tmp_path):
    rng = np.random.default_rng(int(os.environ.get("BULKDET_KILL_SEED", time.time_ns() % 100_000)))
    src = tmp_path / "src"
    src.mkdir()
    contents = [_jpeg_with_tail(rng, 40_000) for _ in range(80)]
    for i, data in enumerate(contents):
        (src / f"f{i:03d}.jpg").write_bytes(data)
    for i in range(0, 80, 10):  # a second path for every tenth content
        (src / f"copy_{i:03d}.jpg").write_bytes(contents[i])
    cmd = [sys.executable, "-m", "bulkdet", "pack", src, "--out", tmp_path / "ds", "--shard-size-mb", "1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # --shard-size-mb 1: a transaction commits every ~1 MB (~25 files), so kills land between
    # and inside commits. Kill when the shards have grown past a random size.
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.uniform(0.3, 3.0) * 1e6 + sum(p.stat().st_size for p in (tmp_path / "ds").rglob("*.lmdb"))
        while proc.poll() is None and sum(p.stat().st_size for p in (tmp_path / "ds").rglob("*.lmdb")) < target:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        _check_shards(tmp_path / "ds" / "shards")  # committed shards stay valid after each kill
    assert kills >= 1

    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    paths = Counter(row["path"] for row in manifest)
    assert paths == Counter(p.name for p in src.iterdir())  # every file once
    assert {row["status"] for row in manifest} == {"ok"}
    stored = _check_shards(tmp_path / "ds" / "shards")
    assert set(stored) == {hashlib.sha256(c).digest() for c in contents}  # each content once
    reader = ShardReader(tmp_path / "ds" / "shards")
    for row in manifest:
        assert stored[row["key"]] == row["shard"]
        (data,) = reader.get_many(row["shard"], [row["key"]])
        assert data == (src / row["path"]).read_bytes()
    reader.close()


def test_same_bytes_under_several_paths_are_stored_once(tmp_path):
    rng = np.random.default_rng(3)
    data = _jpeg_with_tail(rng, 1000)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.jpg").write_bytes(data)
    (tmp_path / "src" / "sub" / "b.jpg").write_bytes(data)
    first = pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    assert first.duplicates == 1 and first.stored_bytes == len(data)
    (tmp_path / "src" / "later_copy.jpg").write_bytes(data)  # added later: an incremental pack
    second = pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    assert second.new == 1 and second.duplicates == 1 and second.stored_bytes == 0
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    assert sorted(r["path"] for r in manifest) == ["a.jpg", "later_copy.jpg", "sub/b.jpg"]
    assert {r["key"] for r in manifest} == {hashlib.sha256(data).digest()}
    assert len(set(r["image_id"] for r in manifest)) == 3
    assert [len(shard_keys(p)) for p in existing_shards(tmp_path / "ds" / "shards").values()] == [1]


def test_a_shard_file_lmdb_cannot_open_is_ignored(tmp_path):
    """A pack killed between creating a shard file and LMDB's first write leaves 0 bytes."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(_jpeg_with_tail(np.random.default_rng(4), 100))
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    (tmp_path / "ds" / "shards" / "shard-00000.lmdb").write_bytes(b"")
    summary = pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    (row,) = read_manifest(tmp_path / "ds").to_pylist()
    assert row["status"] == "ok" and row["shard"] == 1 and summary.stored_bytes > 0
