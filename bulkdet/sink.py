"""Parquet parts that appear only complete, a journal of commits, and resume.

A commit writes the detections part, then the images part, each to a temporary name,
fsynced and renamed; the images part is the commit marker. On resume, detections parts
without their images part and temporary files are removed, and images already in a
committed images part are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulkdet.atomic import TMP_SUFFIX, write_parquet_atomic
from bulkdet.postprocess import Detections

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
# Parts are named by shard (the unit of work), so workers on different shards never collide;
# images with no stored bytes (failed at pack) go to "unstored" parts.
_PART_RE = re.compile(r"part-(s\d{5}|unstored)-(\d{5})\.parquet$")


def _label(shard: int) -> str:
    return "unstored" if shard < 0 else f"s{shard:05d}"


def part_name(shard: int, seq: int) -> str:
    return f"part-{_label(shard)}-{seq:05d}.parquet"


def images_parts(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "images").glob("part-*.parquet"))


def detections_parts(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "detections").glob("part-*.parquet"))


def read_images(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    parts = images_parts(run_dir)
    if not parts:
        return IMAGES_SCHEMA.empty_table().select(columns or IMAGES_SCHEMA.names)
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in parts)


def read_detections(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    parts = detections_parts(run_dir)
    if not parts:
        return DETECTIONS_SCHEMA.empty_table().select(columns or DETECTIONS_SCHEMA.names)
    # class_name dictionaries may differ between parts; unify to plain strings to concatenate.
    tables = [pq.read_table(p, columns=columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()


def resume_shard(run_dir: Path, shard: int) -> set[int]:
    """Image ids of one shard already committed, after removing that shard's leftovers.

    For redoing a shard whose worker died while other workers go on writing other shards:
    only this shard's temporary files and uncommitted detections parts are touched.
    """
    run_dir = Path(run_dir)
    pattern = f"part-{_label(shard)}-*.parquet"
    for tmp in run_dir.glob(f"*/{pattern}{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
    committed = sorted((run_dir / "images").glob(pattern))
    names = {p.name for p in committed}
    for p in (run_dir / "detections").glob(pattern):
        if p.name not in names:
            p.unlink(missing_ok=True)
    return {i for p in committed for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist()}


class ConfigMismatch(Exception):
    pass


def prepare_run_dir(run_dir: Path, fingerprint: dict, overwrite: bool) -> set[int]:
    """Make RUN_DIR ready; returns the image ids already committed (for resume).

    A RUN_DIR made with another model, thresholds or input size is refused unless
    `overwrite`, in which case its previous output is removed.
    """
    run_dir = Path(run_dir)
    state = run_dir / "fingerprint.json"
    if overwrite:
        for name in ("images", "detections"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("journal.jsonl", "run.json", "metrics.parquet", "fingerprint.json"):
            (run_dir / name).unlink(missing_ok=True)
    elif state.exists():
        previous = json.loads(state.read_text())
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed:
            raise ConfigMismatch(
                f"{run_dir} holds a run with different {', '.join(changed)}; "
                "use --overwrite to replace it, or another --out")
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    (run_dir / "detections").mkdir(parents=True, exist_ok=True)
    if not state.exists():
        from bulkdet.atomic import write_json_atomic

        write_json_atomic(fingerprint, state)
    # Leftovers of a killed run: temporary files, and detections parts never committed.
    for tmp in run_dir.glob(f"*/*{TMP_SUFFIX}"):
        tmp.unlink()
    committed = {p.name for p in images_parts(run_dir)}
    for p in detections_parts(run_dir):
        if p.name not in committed:
            p.unlink()
    done = read_images(run_dir, ["image_id"]).column("image_id")
    return set(done.to_numpy().tolist())


class RunSink:
    """Buffers rows and commits them as numbered parts every `commit_images` images."""

    def __init__(self, run_dir: Path, names: dict[int, str], metadata: dict[str, str],
                 commit_images: int = 4096):
        self.run_dir = Path(run_dir)
        self.names = names
        self.metadata = {k: str(v) for k, v in metadata.items()}
        self.commit_images = commit_images
        self.next_seq: dict[str, int] = {}  # part label -> next sequence number
        for p in images_parts(run_dir):
            m = _PART_RE.search(p.name)
            if m:
                self.next_seq[m.group(1)] = max(self.next_seq.get(m.group(1), 0), int(m.group(2)) + 1)
        self.shard: int | None = None  # shard of the rows buffered now
        self.journal = open(self.run_dir / "journal.jsonl", "a")
        self._images: list[pa.Table] = []
        self._detections: list[pa.Table] = []
        self.buffered = 0
        self.committed_parts = 0

    def add_images(self, shard: int, image_ids, paths, width, height, status, error,
                   detections: list[Detections | None]):
        """One row per image; `detections[i]` is None for an image that failed.

        A part holds rows of one shard only: a new shard commits the rows of the last.
        """
        if self.shard is not None and shard != self.shard:
            self.commit()
        self.shard = shard
        n_det = np.array([len(d) if d is not None else 0 for d in detections], np.int32)
        self._images.append(pa.table({
            "image_id": pa.array(image_ids, pa.int64()), "path": pa.array(paths, pa.string()),
            "width": pa.array(width, pa.int32()), "height": pa.array(height, pa.int32()),
            "status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
            "n_det": pa.array(n_det, pa.int32())}, schema=IMAGES_SCHEMA))
        if n_det.sum():
            self._detections.append(self._detections_table(image_ids, paths, detections, n_det))
        self.buffered += len(n_det)
        if self.buffered >= self.commit_images:
            self.commit()

    def _detections_table(self, image_ids, paths, detections, n_det) -> pa.Table:
        dets = [d for d in detections if d is not None and len(d)]
        rows = np.repeat(np.arange(len(n_det)), n_det)
        boxes = np.concatenate([d.boxes for d in dets])
        class_ids = np.concatenate([d.class_ids for d in dets]).astype(np.int16)
        names = [self.names.get(int(c), str(int(c))) for c in np.unique(class_ids)]
        lookup = dict(zip(np.unique(class_ids).tolist(), range(len(names))))
        class_name = pa.DictionaryArray.from_arrays(
            pa.array([lookup[c] for c in class_ids.tolist()], pa.int16()), pa.array(names, pa.string()))
        return pa.table({
            "image_id": pa.array(np.asarray(image_ids, np.int64)[rows]),
            "path": pa.array([paths[r] for r in rows], pa.string()),
            "class_id": pa.array(class_ids), "class_name": class_name,
            "score": pa.array(np.concatenate([d.scores for d in dets]).astype(np.float32)),
            "x1": pa.array(boxes[:, 0]), "y1": pa.array(boxes[:, 1]),
            "x2": pa.array(boxes[:, 2]), "y2": pa.array(boxes[:, 3])}, schema=DETECTIONS_SCHEMA)

    def commit(self) -> None:
        if not self._images:
            return
        label = _label(self.shard)
        seq = self.next_seq.get(label, 0)
        name = part_name(self.shard, seq)
        meta = {**self.metadata, "bulkdet.part": name}
        images = pa.concat_tables(self._images)
        dets = (pa.concat_tables(self._detections).unify_dictionaries() if self._detections
                else DETECTIONS_SCHEMA.empty_table())
        # Detections first: the images part is the commit marker (see module docstring).
        write_parquet_atomic(dets.replace_schema_metadata(meta), self.run_dir / "detections" / name,
                             compression="zstd")
        write_parquet_atomic(images.replace_schema_metadata(meta), self.run_dir / "images" / name,
                             compression="zstd")
        failed = int(pc.sum(pc.not_equal(images.column("status"), "ok")).as_py() or 0)
        self.journal.write(json.dumps({"part": name, "images": len(images), "failed": failed,
                                       "detections": len(dets), "time": time.time()}) + "\n")
        self.journal.flush()
        os.fsync(self.journal.fileno())
        self.next_seq[label] = seq + 1
        self.committed_parts += 1
        self._images.clear()
        self._detections.clear()
        self.buffered = 0

    def close(self) -> None:
        self.commit()
        self.journal.close()
