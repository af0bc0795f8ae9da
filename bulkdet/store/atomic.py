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


@contextmanager
def open_atomic(path: Path, mode: str = "w", fsync: bool = True, **kwargs):
    """A file written in steps (streamed) that appears only complete, at `path`, on success.

    `fsync=False` for the many small files of one output folder (YOLO labels, crops): renaming
    still hides a half-written file from a killed process; fsyncing each one would dominate.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with _removed_on_error(tmp):
        with open(tmp, mode, **kwargs) as f:
            yield f
        if fsync:
            _commit(tmp, path)
        else:
            os.replace(tmp, path)
