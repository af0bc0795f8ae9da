"""Files that appear only complete: write to a temporary name, fsync, rename.

Every file bulkdet writes goes through here. In a folder that bulkdet owns (a dataset, a run
folder) the temporary name is the file's name + TMP_SUFFIX, which a later run recognises and
removes. Elsewhere pass `per_process=True`: the temporary name is hidden and holds the process
id, so two processes writing one cache entry (two Ray workers building the same engine) never
share a temporary file, and no file of the user's is taken for one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path, per_process: bool = False) -> Path:
    """Where `path` is written before it is committed (beside it: the rename stays on one file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}" if per_process else path.name + TMP_SUFFIX)


def commit(tmp: Path, path: Path) -> Path:
    """Put a completely written temporary file in place: fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
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


@contextmanager
def atomic_path(path: Path, per_process: bool = False) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; committed when the block ends, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, per_process)
    with _removed_on_error(tmp):
        yield tmp
        commit(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_bytes_atomic(data: bytes, path: Path, per_process: bool = False) -> Path:
    with atomic_path(path, per_process) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(text: str, path: Path, per_process: bool = False) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), path, per_process)


def write_json_atomic(obj, path: Path, per_process: bool = False) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2, default=str) + "\n", path, per_process)


def copy_atomic(source: Path, path: Path, per_process: bool = False) -> Path:
    with atomic_path(path, per_process) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


@contextmanager
def open_atomic(path: Path, mode: str = "w", fsync: bool = True, **kwargs):
    """A file written in steps (streamed) that appears only complete, at `path`, on success.

    `fsync=False` for the many small files of one output folder (YOLO labels, crops): renaming
    still hides a half-written file from a killed process; fsyncing each one would dominate.
    The temporary name holds the process id: a user's own `name.tmp` is never touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, per_process=True)
    with _removed_on_error(tmp):
        with open(tmp, mode, **kwargs) as f:
            yield f
        if fsync:
            commit(tmp, path)
        else:
            os.replace(tmp, path)
