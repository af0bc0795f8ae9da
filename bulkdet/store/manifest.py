"""The dataset manifest: one row per file found by `pack`."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bulkdet.store.atomic import write_json_atomic, write_parquet_atomic

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),  # relative to the packed source folder
    ("shard", pa.int32()),  # -1 when the file's bytes are not stored (non-ok status)
    ("key", pa.binary()),  # sha256 of the bytes; the LMDB key
    ("bytes", pa.int64()),
    ("format", pa.string()),
    ("width", pa.int32()),  # upright (EXIF orientation applied)
    ("height", pa.int32()),
    ("orientation", pa.int8()),
    ("status", pa.string()),
    ("error", pa.string()),
])


def manifest_path(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / "manifest.parquet"


def read_manifest(dataset_dir: Path) -> pa.Table:
    path = manifest_path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {dataset_dir} a dataset made by `bulkdet pack`?")
    return pq.read_table(path, schema=MANIFEST_SCHEMA)


def write_manifest(dataset_dir: Path, rows: list[dict]) -> Path:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).sort_by("image_id")
    return write_parquet_atomic(table, manifest_path(dataset_dir))


DATASET_FILE = "dataset.json"  # the dataset's identity, written once by the pack that creates it


def dataset_id(dataset_dir: Path) -> str:
    """What a run folder remembers of its dataset: the id pack gave it (a re-pack keeps it).

    A dataset packed before ids existed is identified by its resolved path.
    """
    path = Path(dataset_dir) / DATASET_FILE
    if path.exists():
        return json.loads(path.read_text())["dataset_id"]
    return f"path:{Path(dataset_dir).resolve()}"


def ensure_dataset_id(dataset_dir: Path) -> str:
    """The dataset's id, made (a random uuid) and written when the dataset has none yet."""
    path = Path(dataset_dir) / DATASET_FILE
    if not path.exists():
        write_json_atomic({"dataset_id": uuid.uuid4().hex, "created": time.time()}, path)
    return dataset_id(dataset_dir)
