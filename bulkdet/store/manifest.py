"""The dataset manifest: one row per file found by `pack`."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulkdet.store.atomic import write_json_atomic, write_parquet_atomic

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),  # relative to the source (folder, list file's folder, tar, URL prefix)
    # -1 when the file's bytes are not stored (non-ok status). Packed by reference: a pseudo-shard,
    # a group of rows of bounded source bytes, the unit of work and resume like a real shard.
    ("shard", pa.int32()),
    ("key", pa.binary()),  # sha256 of the bytes; the LMDB key
    ("bytes", pa.int64()),  # the file's size
    ("format", pa.string()),
    ("width", pa.int32()),  # upright (EXIF orientation applied)
    ("height", pa.int32()),
    ("orientation", pa.int8()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("mtime_ns", pa.int64()),  # the file's modification time: with `bytes`, what re-pack compares first
    ("offset", pa.int64()),  # a tar member's data offset in the archive (read there by reference); else null
])

# Which rows a run processes (decodes and detects): those whose bytes are stored. A `corrupt`
# image (damaged data found at pack) is processed too: a partly grey image may still hold a
# useful detection; its row keeps the status and the reason.
PROCESSED_STATUSES = ("ok", "corrupt")
# Rows re-pack keeps only so that image ids stay stable: the file is gone (`deleted`) or its
# content changed (`replaced`, by a row with a new image_id). A run gives them no row.
RETIRED_STATUSES = ("deleted", "replaced")


def processed(table: pa.Table) -> pa.Table:
    """The manifest rows a run decodes and runs through the model."""
    return table.filter(pc.is_in(table.column("status"), pa.array(PROCESSED_STATUSES)))


def unprocessed(table: pa.Table) -> pa.Table:
    """The rows a run writes as they are (failed at pack: no bytes to process); retired rows excluded."""
    return table.filter(pc.invert(pc.is_in(table.column("status"),
                                           pa.array(PROCESSED_STATUSES + RETIRED_STATUSES))))


MANIFEST_NAME = "manifest.parquet"


def manifest_path(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / MANIFEST_NAME


def read_manifest(dataset_dir: Path) -> pa.Table:
    path = manifest_path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {dataset_dir} a dataset made by `bulkdet pack`?")
    table = pq.read_table(path)
    for name in MANIFEST_SCHEMA.names:  # a manifest written before a column existed: nulls
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), MANIFEST_SCHEMA.field(name).type))
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


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


def record_source(dataset_dir: Path, source: dict) -> str | None:
    """Remember what this pack read (dataset.json: `source`, `source_kind`, `reference`, and
    `storage_options` without credentials); returns the source the last pack read."""
    path = Path(dataset_dir) / DATASET_FILE
    info = json.loads(path.read_text())
    previous = info.get("source")
    if any(info.get(k) != v for k, v in source.items()):
        write_json_atomic({**info, **source}, path)
    return previous


def ensure_dataset_id(dataset_dir: Path) -> str:
    """The dataset's id, made (a random uuid) and written when the dataset has none yet."""
    path = Path(dataset_dir) / DATASET_FILE
    if not path.exists():
        write_json_atomic({"dataset_id": uuid.uuid4().hex, "created": time.time()}, path)
    return dataset_id(dataset_dir)
