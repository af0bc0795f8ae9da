"""LMDB shards: key = sha256 of the file's bytes, value = the bytes, unchanged."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lmdb

log = logging.getLogger("bulkdet")

SHARD_NAME = "shard-{:05d}.lmdb"
_SHARD_RE = re.compile(r"shard-(\d{5})\.lmdb$")


def shard_path(shards_dir: Path, shard: int) -> Path:
    return Path(shards_dir) / SHARD_NAME.format(shard)


def existing_shards(shards_dir: Path) -> dict[int, Path]:
    """Shard number -> file, for every shard file in the folder."""
    found = {}
    for p in Path(shards_dir).glob("shard-*.lmdb"):
        m = _SHARD_RE.search(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


class ShardDamaged(RuntimeError):
    """A shard file is missing or damaged: reading it would fail, or kill the process (SIGBUS)."""


def open_shard(path: Path, **kwargs) -> lmdb.Environment:
    """Open a shard read-only after checking it is whole; raises ShardDamaged naming what is wrong.

    LMDB maps the file: a page past the end of a truncated file kills the reader with SIGBUS
    (no exception). So the file's size is checked against LMDB's own header first: the last
    page the latest committed transaction uses must lie within the file.
    """
    try:
        size = Path(path).stat().st_size
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, **kwargs)
    except FileNotFoundError:
        raise ShardDamaged(f"shard {path} is missing") from None
    except (OSError, lmdb.Error) as exc:
        raise ShardDamaged(f"shard {path} cannot be opened by LMDB: {exc}") from None
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < needed:
        env.close()
        raise ShardDamaged(f"shard {path} is truncated: {size} bytes, its LMDB header says {needed}")
    return env


def shard_keys(path: Path) -> set[bytes]:
    """All keys committed in a shard (a killed pack leaves only committed transactions).

    A shard that is damaged (see open_shard) counts as empty: the caller stores its images
    again. A pack killed while creating a shard can leave a file LMDB can't open (0 bytes),
    which holds nothing committed anyway.
    """
    try:
        env = open_shard(path)
    except ShardDamaged as exc:
        log.warning("ignoring %s", exc)
        return set()
    try:
        with env.begin() as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}
    finally:
        env.close()


class ShardWriteError(RuntimeError):
    pass


class ShardWriter:
    """Appends values to numbered shards, starting a new shard past `shard_bytes`.

    Writes are grouped into transactions of about `txn_bytes`; a killed writer leaves every
    committed transaction readable. When the LMDB map is full, the map grows and the
    pending transaction (held in memory, at most `txn_bytes`) is replayed.
    """

    def __init__(self, shards_dir: Path, first_shard: int, shard_bytes: int, txn_bytes: int = 64 << 20,
                 initial_map_bytes: int | None = None):
        self.shards_dir = Path(shards_dir)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.txn_bytes = min(txn_bytes, shard_bytes)
        self.initial_map_bytes = initial_map_bytes or max(shard_bytes * 2, 64 << 20)
        self.shard = first_shard - 1
        self.env = None
        self.pending: list[tuple[bytes, bytes]] = []
        self.bytes_in_shard = 0
        self.bytes_pending = 0
        self.map_growths = 0

    def put(self, key: bytes, value: bytes) -> int:
        """Store one value; returns the shard it went to."""
        if self.env is None or (self.bytes_in_shard and self.bytes_in_shard + len(value) > self.shard_bytes):
            self._next_shard()
        self.pending.append((key, value))
        self.bytes_in_shard += len(value)
        self.bytes_pending += len(value)
        if self.bytes_pending >= self.txn_bytes:
            self.commit()
        return self.shard

    def commit(self) -> None:
        """Write the pending values in one transaction, growing the map until they fit."""
        if self.env is None or not self.pending:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value, overwrite=False)
                break
            except lmdb.MapFullError:  # the transaction was aborted: grow and replay
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                self.map_growths += 1
            except lmdb.Error as exc:  # e.g. disk full: earlier transactions stay committed
                raise ShardWriteError(
                    f"cannot write {shard_path(self.shards_dir, self.shard)}: {exc}; the files stored "
                    "so far are kept: fix the cause and run the same pack command again") from exc
        self.pending.clear()
        self.bytes_pending = 0

    def close(self) -> None:
        if self.env is not None:
            self.commit()
            self.env.sync()
            self.env.close()
            self.env = None

    def _next_shard(self) -> None:
        self.close()
        self.shard += 1
        self.bytes_in_shard = 0
        self.env = lmdb.open(
            str(shard_path(self.shards_dir, self.shard)), subdir=False,
            map_size=self.initial_map_bytes, readahead=False, meminit=False,
        )


class ShardReader:
    """Read-only access to many shards, opened lazily and kept open."""

    def __init__(self, shards_dir: Path):
        self.shards_dir = Path(shards_dir)
        self._envs: dict[int, lmdb.Environment] = {}

    def open(self, shard: int) -> lmdb.Environment:
        """The shard's environment, checked when first opened (a damaged shard raises ShardDamaged)."""
        env = self._envs.get(shard)
        if env is None:
            path = shard_path(self.shards_dir, shard)
            try:
                env = open_shard(path, readahead=False, max_readers=512)
            except ShardDamaged as exc:
                raise ShardDamaged(f"the dataset is damaged: {exc}. Run the same `bulkdet pack` again: it "
                                   "stores that shard's images again from the source folder") from None
            self._envs[shard] = env
        return env

    def get_many(self, shard: int, keys: list[bytes]) -> list[bytes | None]:
        with self.open(shard).begin(buffers=False) as txn:
            return [txn.get(k) for k in keys]

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
