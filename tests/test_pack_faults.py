"""pack under faults: LMDB map growth, kill -9 mid-pack, duplicate contents, broken shard files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import lmdb
import numpy as np
import pytest
from PIL import Image

from bulkdet.ingest.pack import ordered_map, pack
from bulkdet.store.lock import LOCK_NAME
from bulkdet.store.manifest import read_manifest
from bulkdet.store.shards import ShardDamaged, ShardReader, ShardWriter, existing_shards, shard_keys, shard_path
from conftest import ROOT, run_bulkdet


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


def _lock_holder(lock_file) -> int | None:
    try:
        return json.loads(lock_file.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_two_packs_into_one_dataset_the_second_exits_2_and_a_killed_ones_lock_is_taken_over(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):  # enough work that the first pack is still running when it is stopped
        (src / f"f{i:03d}.jpg").write_bytes(_jpeg_with_tail(rng, 30_000))
    cmd = [sys.executable, "-m", "bulkdet", "pack", src, "--out", tmp_path / "ds", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lock_file = tmp_path / "ds" / LOCK_NAME

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _lock_holder(lock_file) != first.pid and first.poll() is None:
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)  # holds the lock, mid-pack, for as long as the test needs
    try:
        assert first.poll() is None, "the first pack finished before it could be stopped"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()  # one error line, no traceback
        assert line.startswith("error:") and f"pack (pid {first.pid} on " in line
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        first.wait()
    assert _lock_holder(lock_file) == first.pid  # the stale lock file names the dead pack

    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    assert sorted(r["path"] for r in manifest) == sorted(p.name for p in src.iterdir())
    assert {r["status"] for r in manifest} == {"ok"}


def _pack_and_truncate(tmp_path, keep: float):
    """A dataset of 30 images in one shard, then the shard cut to `keep` of its size."""
    rng = np.random.default_rng(6)
    (tmp_path / "src").mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), np.uint8)).save(tmp_path / "src" / f"{i:02d}.png")
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    shard = shard_path(tmp_path / "ds" / "shards", 0)
    os.truncate(shard, int(shard.stat().st_size * keep))
    return shard


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
@pytest.mark.slow
def test_a_damaged_shard_is_a_clear_error_naming_it_and_re_pack_repairs_it(tmp_path, analytic_model, damage):
    shard = _pack_and_truncate(tmp_path, 0.5)
    if damage == "deleted":
        shard.unlink()
    reader = ShardReader(tmp_path / "ds" / "shards")
    with pytest.raises(ShardDamaged, match=f"{shard}.*{'truncated' if damage == 'truncated' else 'missing'}"
                       ".*bulkdet pack"):
        reader.get_many(0, [b"any key"])
    # `bulkdet run` on it: an error line, not SIGBUS (truncated) or a traceback (deleted).
    r = run_bulkdet("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "-q",
                    "--imgsz", 160)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1].startswith("error: the dataset is damaged: shard ")

    summary = pack(tmp_path / "src", tmp_path / "ds", quiet=True)  # the same pack again
    assert summary.restored == 30 and summary.new == summary.changed == 0  # same rows, same ids
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    # Stored in a new shard (numbered past the damaged file, which is left as it is).
    assert {r["status"] for r in manifest} == {"ok"} and {r["shard"] for r in manifest} == {
        1 if damage == "truncated" else 0}
    reader = ShardReader(tmp_path / "ds" / "shards")
    for row in manifest:
        assert reader.get_many(row["shard"], [row["key"]]) == [(tmp_path / "src" / row["path"]).read_bytes()]
    reader.close()


def test_large_files_that_are_no_images_are_read_no_further_than_their_header(tmp_path):
    """Four 256 MB files (sparse: no disk used) that are no images: the pack process must not
    hold their bytes (it read all of each, in parallel, before)."""
    (tmp_path / "src").mkdir()
    for i in range(4):
        with open(tmp_path / "src" / f"big{i}.bin", "wb") as f:
            f.truncate(256 << 20)
    code = ("import sys; from bulkdet.ingest.pack import pack; pack(sys.argv[1], sys.argv[2], quiet=True); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code, tmp_path / "src", tmp_path / "ds"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    rows = read_manifest(tmp_path / "ds").to_pylist()
    assert [(r["status"], r["bytes"]) for r in rows] == [("unsupported", 256 << 20)] * 4
    peak_mb = int(r.stdout.split()[1]) / 1024
    assert peak_mb < 250, f"pack peaked at {peak_mb:.0f} MB"


def test_bytes_in_flight_are_bounded_not_the_file_count():
    """ordered_map keeps at most `budget` of cost in flight (a larger item alone), in order."""
    lock = threading.Lock()
    in_flight, peak = [0], [0]

    def work(size):
        with lock:
            in_flight[0] += size
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.002)
        return size

    sizes = [40, 40, 40, 300, 10, 10, 90, 90, 5] * 3
    with ThreadPoolExecutor(8) as pool:
        out = []
        for size in ordered_map(pool, work, sizes, window=32, cost=lambda s: s, budget=100):
            out.append(size)
            with lock:  # the caller is done with it: its bytes are released
                in_flight[0] -= size
    assert out == sizes
    assert peak[0] == 300  # the 300 went alone; everything else stayed within 100
