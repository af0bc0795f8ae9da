"""The run folder's contents and how to read them: one home for its schemas, names and readers.

A run folder holds:

    images/part-<label>-<seq>.parquet      one row per input file (IMAGES_SCHEMA): the commit marker
    detections/part-<label>-<seq>.parquet  one row per detection (DETECTIONS_SCHEMA), same name
    journal.jsonl                          one line per commit (human-readable record)
    run.json                               what ran, how, and how it ended (state)
    fingerprint.json                       what the results depend on (model, thresholds, dataset)
    metrics.parquet                        one row per batch: where the time went
    eval.json                              the last `bulkdet eval` against labels (optional)
    .bulkdet.lock                          who is writing it now (store/lock.py)

Everything that reads results (report, export, crops, eval, the tests) reads through this
module; only store/run_folder.py writes. Readers stream where a run can be large.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from bulkdet.store.manifest import PROCESSED_STATUSES

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_det", pa.int32()),
])
DETECTIONS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),
    ("class_id", pa.int16()),
    ("class_name", pa.dictionary(pa.int16(), pa.string())),
    ("score", pa.float32()),
    ("x1", pa.float32()),
    ("y1", pa.float32()),
    ("x2", pa.float32()),
    ("y2", pa.float32()),
])

IMAGES_DIR, DETECTIONS_DIR = "images", "detections"
RUN_JSON, FINGERPRINT, JOURNAL, METRICS = "run.json", "fingerprint.json", "journal.jsonl", "metrics.parquet"
EVAL = "eval.json"  # written by `bulkdet eval`
# Images rows whose detections were written: ok, and corrupt (damaged data that still decoded).
RESULT_STATUSES = PROCESSED_STATUSES
# Parts are named by shard (the unit of work), so workers on different shards never collide;
# images with no stored bytes (failed at pack) go to "unstored" parts.
PART_RE = re.compile(r"^part-(s\d{5}|unstored)-(\d{5})\.parquet$")


class BrokenPart(ValueError):
    """A committed part cannot be read (truncated, deleted, or not Parquet)."""


def part_label(shard: int) -> str:
    return "unstored" if shard < 0 else f"s{shard:05d}"


def part_name(shard: int, seq: int) -> str:
    return f"part-{part_label(shard)}-{seq:05d}.parquet"


def _parts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("part-*.parquet") if PART_RE.match(p.name))


def images_parts(run_dir: Path) -> list[Path]:
    return _parts(Path(run_dir) / IMAGES_DIR)


def detections_parts(run_dir: Path) -> list[Path]:
    return _parts(Path(run_dir) / DETECTIONS_DIR)


def is_run_folder(path: Path) -> bool:
    """A folder `bulkdet run` made (it writes these two first)."""
    return (Path(path) / FINGERPRINT).is_file() or (Path(path) / RUN_JSON).is_file()


def read_run_json(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder made by `bulkdet run`?")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BrokenPart(f"{path} is not valid JSON ({exc}); run the same `bulkdet run` command again") from None


def _read(part: Path, columns: list[str] | None) -> pa.Table:
    try:
        return pq.read_table(part, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BrokenPart(f"{part} cannot be read ({exc}); run the same `bulkdet run` command again: "
                         "it checks the committed parts and redoes broken ones") from None


def read_images(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    parts = images_parts(run_dir)
    if not parts:
        return IMAGES_SCHEMA.empty_table().select(columns or IMAGES_SCHEMA.names)
    return pa.concat_tables(_read(p, columns) for p in parts)


def read_detections(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    parts = detections_parts(run_dir)
    if not parts:
        return DETECTIONS_SCHEMA.empty_table().select(columns or DETECTIONS_SCHEMA.names)
    # class_name dictionaries may differ between parts; unify to concatenate.
    tables = [_read(p, columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()


def _scan(parts: list[Path], schema: pa.Schema, columns, filter) -> Iterator[pa.RecordBatch]:
    if not parts:
        return
    try:
        dataset = pads.dataset([str(p) for p in parts], schema=schema, format="parquet")
        yield from dataset.to_batches(columns=columns, filter=filter)
    except (OSError, pa.ArrowException) as exc:
        raise BrokenPart(f"a part of {parts[0].parent.parent} cannot be read ({exc}); run the same "
                         "`bulkdet run` command again: it checks the committed parts and redoes broken ones") from None


def iter_images(run_dir: Path, columns: list[str] | None = None, filter=None) -> Iterator[pa.RecordBatch]:
    """Images rows as record batches (`filter`: a pyarrow.dataset expression): memory bounded by a batch."""
    return _scan(images_parts(run_dir), IMAGES_SCHEMA, columns, filter)


def iter_detections(run_dir: Path, columns: list[str] | None = None, filter=None) -> Iterator[pa.RecordBatch]:
    """Detection rows as record batches; `class_name` stays dictionary-encoded per batch."""
    return _scan(detections_parts(run_dir), DETECTIONS_SCHEMA, columns, filter)


def count_results(run_dir: Path) -> dict:
    """Totals counted from the committed parts: images, failed, detections, by_status."""
    rows = read_images(run_dir, ["status", "n_det"])
    by_status = Counter(rows.column("status").to_pylist())
    return {"images": len(rows), "failed": len(rows) - by_status.get("ok", 0),
            "detections": int(pc.sum(rows.column("n_det")).as_py() or 0), "by_status": dict(by_status)}


def committed_ids(run_dir: Path) -> set[int]:
    return set(read_images(run_dir, ["image_id"]).column("image_id").to_numpy().tolist())


def read_metrics(run_dir: Path) -> pa.Table | None:
    """metrics.parquet of a run folder, or None when the run recorded no batch."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return None
    return _read(path, None)


def read_eval(run_dir: Path) -> dict | None:
    """The eval saved in the run folder, if it was made for this run (not one it replaced)."""
    path = Path(run_dir) / EVAL
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("run_id") == read_run_json(run_dir).get("run_id") else None


def count_images(run_dir: Path) -> int:
    """Images committed in the run, from the parts' footers (nothing else read)."""
    return sum(pq.read_metadata(p).num_rows for p in images_parts(run_dir))


@dataclass
class PartResults:
    """One committed part: its images, and their detections grouped by image.

    The detections of `images` row i are `detections` rows offsets[i]:offsets[i + 1], in the
    order the run stored them.
    """
    images: pa.Table
    detections: pa.Table
    offsets: np.ndarray

    def column(self, table: str, name: str) -> np.ndarray:
        return getattr(self, table).column(name).to_numpy(zero_copy_only=False)


def iter_parts(run_dir: Path, conf: float | None = None, class_ids: list[int] | None = None,
               image_columns: list[str] | None = None) -> Iterator[PartResults]:
    """The run's parts in order, detections filtered (score >= conf, class in class_ids).

    `class_name` comes out as plain strings.
    """
    run_dir = Path(run_dir)
    det_dir = {p.name: p for p in detections_parts(run_dir)}
    for part in images_parts(run_dir):
        images = _read(part, image_columns or IMAGES_SCHEMA.names)
        det_part = det_dir.get(part.name)
        dets = _read(det_part, None) if det_part is not None else DETECTIONS_SCHEMA.empty_table()
        keep = None
        if conf is not None:
            keep = pc.greater_equal(dets.column("score"), pa.scalar(conf, pa.float32()))
        if class_ids is not None:
            in_classes = pc.is_in(dets.column("class_id"), pa.array(class_ids, pa.int16()))
            keep = in_classes if keep is None else pc.and_(keep, in_classes)
        if keep is not None:
            dets = dets.filter(keep)
        names = dets.column("class_name")
        if isinstance(names.type, pa.DictionaryType):
            dets = dets.set_column(dets.schema.get_field_index("class_name"), "class_name",
                                   names.cast(pa.string()))
        yield _group(images, dets)


def _group(images: pa.Table, dets: pa.Table) -> PartResults:
    """Order detections by their image's row in `images`; offsets per image row."""
    n = len(images)
    img_ids = images.column("image_id").to_numpy()
    det_ids = dets.column("image_id").to_numpy()
    order = np.argsort(img_ids, kind="stable")
    at = np.clip(np.searchsorted(img_ids[order], det_ids), 0, max(n - 1, 0))
    row = order[at] if n else at
    if len(det_ids) and (n == 0 or not np.array_equal(img_ids[row], det_ids)):
        raise BrokenPart("a detections part holds an image its images part does not: the run folder is "
                         "damaged; run the same `bulkdet run` command again: it checks and redoes broken parts")
    perm = np.argsort(row, kind="stable")
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=n)[:n], out=offsets[1:])
    return PartResults(images, dets.take(perm), offsets)
