"""Streaming reads of a run folder for `export`, `crops` and `eval`: one committed part at a time.

A run can hold millions of detections; these readers hold one part (at most `--commit-every`
images and their detections) in memory, never the whole run. They build on the run folder's
read API (store/parts.py: the part lists and schemas, and a part's images and detections
sharing one name) and run.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulkdet.results.report import read_run_json
from bulkdet.store.parts import DETECTIONS_SCHEMA, IMAGES_SCHEMA, detections_parts, images_parts


class UsageError(ValueError):
    """The user asked for something the run cannot give (e.g. a class it does not have)."""


@dataclass
class RunInfo:
    """What the readers of a run need from run.json."""
    run_dir: Path
    run: dict  # run.json as stored
    names: dict[int, str]  # class id -> name, from the model (or --names) the run used

    @property
    def config(self) -> dict:
        return self.run.get("config", {})

    @classmethod
    def load(cls, run_dir: Path) -> "RunInfo":
        run = read_run_json(run_dir)
        names = {int(k): str(v) for k, v in (run.get("model", {}).get("names") or {}).items()}
        return cls(Path(run_dir), run, names)

    def class_ids(self, classes: list[str] | None) -> list[int] | None:
        """Class ids for names or ids given by the user (None: all). Unknown ones raise UsageError."""
        if not classes:
            return None
        by_name = {v: k for k, v in self.names.items()}
        ids = []
        for c in (c.strip() for item in classes for c in item.split(",")):
            if c in by_name:
                ids.append(by_name[c])
            elif c.isdigit() and (int(c) in self.names or not self.names):
                ids.append(int(c))
            elif c:
                known = ", ".join(f"{k}={v}" for k, v in sorted(self.names.items()))
                raise UsageError(f"unknown class {c!r}; the run's classes are: {known}")
        return sorted(set(ids))


def count_images(run_dir: Path) -> int:
    """Images committed in the run, from the parts' footers (nothing else read)."""
    return sum(pq.read_metadata(p).num_rows for p in images_parts(run_dir))


def iter_images(run_dir: Path, columns: list[str]) -> Iterator[dict]:
    """The images rows of the run, as dicts, one record batch in memory at a time."""
    for part in images_parts(run_dir):
        for batch in pq.ParquetFile(part).iter_batches(columns=columns):
            yield from batch.to_pylist()


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
        images = pq.read_table(part, columns=image_columns or IMAGES_SCHEMA.names)
        det_part = det_dir.get(part.name)
        dets = pq.read_table(det_part) if det_part is not None else DETECTIONS_SCHEMA.empty_table()
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
        raise RuntimeError("a detections part holds an image its images part does not: "
                           "the run folder is damaged")
    perm = np.argsort(row, kind="stable")
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=n)[:n], out=offsets[1:])
    return PartResults(images, dets.take(perm), offsets)
