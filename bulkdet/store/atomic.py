"""Files that appear only complete: write to a temporary name, fsync, rename."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> Path:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextmanager
def _removed_on_error(tmp: Path):
    """A failed write (e.g. disk full) removes its partial temporary file, freeing the space."""
    try:
        yield
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error is the one to report
        raise


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with _removed_on_error(tmp):
        pq.write_table(table, tmp, **kwargs)
        return _commit(tmp, path)


def write_json_atomic(obj, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with _removed_on_error(tmp):
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        return _commit(tmp, path)
