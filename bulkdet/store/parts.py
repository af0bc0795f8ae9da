"""Parquet parts that appear only complete, a journal of commits, and resume.

A commit writes the detections part, then the images part, each to a temporary name,
fsynced and renamed; the images part is the commit marker. On resume, detections parts
without their images part and temporary files are removed, and images already in a
committed images part are skipped.
"""

from __future__ import annotations

import errno
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

from bulkdet.store.atomic import TMP_SUFFIX, fsync_dir, write_json_atomic, write_parquet_atomic
from bulkdet.run.postprocess import Detections

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
        fingerprint = json.loads(json.dumps(fingerprint))  # as stored: e.g. int dict keys become strings
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed:
            raise ConfigMismatch(
                f"{run_dir} holds a run with different {', '.join(changed)}; "
                "use --overwrite to replace it, or another --out")
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    (run_dir / "detections").mkdir(parents=True, exist_ok=True)
    if not state.exists():
        write_json_atomic(fingerprint, state)
    # Leftovers of a killed run: temporary files, and detections parts never committed.
    for tmp in [*run_dir.glob(f"*{TMP_SUFFIX}"), *run_dir.glob(f"*/*{TMP_SUFFIX}")]:
        tmp.unlink()
    committed = {p.name for p in images_parts(run_dir)}
    for p in detections_parts(run_dir):
        if p.name not in committed:
            p.unlink()
    _repair_journal(run_dir, committed)
    done = read_images(run_dir, ["image_id"]).column("image_id")
    return set(done.to_numpy().tolist())


def _repair_journal(run_dir: Path, committed: set[str]) -> None:
    """After a kill: end a torn last line, and record parts committed after the last entry.

    The images part is the commit; the journal line follows it, so a kill in between leaves
    a committed part without its line.
    """
    path = run_dir / "journal.jsonl"
    text = path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
    logged = set()
    for line in text.splitlines():
        try:
            logged.add(json.loads(line)["part"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn line: its part, if committed, is recovered below
    missing = sorted(committed - logged)
    if not missing and (not text or text.endswith("\n")):
        return
    with open(path, "a") as journal:
        if text and not text.endswith("\n"):
            journal.write("\n")
        for name in missing:
            images = pq.read_metadata(run_dir / "images" / name).num_rows
            journal.write(json.dumps({"part": name, "images": images, "recovered": True,
                                      "time": time.time()}) + "\n")
        journal.flush()
        os.fsync(journal.fileno())


def drop_failed_rows(run_dir: Path, retryable_ids: set[int]) -> set[int]:
    """For --retry-failed: remove the non-ok rows of these images from their committed parts.

    Each affected images part is rewritten atomically without those rows (a part left with
    no rows is removed, images part first); the images are then no longer committed and the
    run processes them again. A kill at any point leaves each image in at most one part.
    Failed images have no detections, so detections parts stay as they are.
    """
    run_dir = Path(run_dir)
    dropped: set[int] = set()
    ids = pa.array(sorted(retryable_ids), pa.int64())
    with open(run_dir / "journal.jsonl", "a") as journal:
        for part in images_parts(run_dir):
            table = pq.read_table(part)
            drop = pc.and_(pc.not_equal(table.column("status"), "ok"), pc.is_in(table.column("image_id"), ids))
            n = int(pc.sum(drop).as_py() or 0)
            if not n:
                continue
            dropped.update(table.filter(drop).column("image_id").to_pylist())
            if n == len(table):
                part.unlink()
                (run_dir / "detections" / part.name).unlink(missing_ok=True)
                fsync_dir(part.parent)
            else:
                write_parquet_atomic(table.filter(pc.invert(drop)), part, compression="zstd")
            journal.write(json.dumps({"part": part.name, "retry_dropped": n, "time": time.time()}) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
    return dropped


class SinkWriteError(RuntimeError):
    """Writing a part failed (disk full, I/O error); committed parts are intact."""


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
        self.broken = False  # a write failed: buffered rows are not retried at close

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
        failed = int(pc.sum(pc.not_equal(images.column("status"), "ok")).as_py() or 0)
        target = self.run_dir / "detections" / name
        try:
            # Detections first: the images part is the commit marker (see module docstring).
            write_parquet_atomic(dets.replace_schema_metadata(meta), target, compression="zstd")
            target = self.run_dir / "images" / name
            write_parquet_atomic(images.replace_schema_metadata(meta), target, compression="zstd")
            target = self.run_dir / "journal.jsonl"
            self.journal.write(json.dumps({"part": name, "images": len(images), "failed": failed,
                                           "detections": len(dets), "time": time.time()}) + "\n")
            self.journal.flush()
            os.fsync(self.journal.fileno())
        except OSError as exc:
            self.broken = True
            raise SinkWriteError(_write_error_message(exc, target, self.committed_parts)) from exc
        self.next_seq[label] = seq + 1
        self.committed_parts += 1
        self._images.clear()
        self._detections.clear()
        self.buffered = 0

    def close(self) -> None:
        try:
            if not self.broken:
                self.commit()
        finally:
            try:
                self.journal.close()
            except OSError:
                pass  # its lines are fsynced at each commit; a failed flush loses none of them


def _write_error_message(exc: OSError, path: Path, committed_parts: int) -> str:
    disk_full = exc.errno == errno.ENOSPC or "no space left" in str(exc).lower()  # Arrow's OSError has no errno
    what = "disk full (no space left on device)" if disk_full else (exc.strerror or str(exc))
    return (f"{what} while writing {path}; the {committed_parts} part(s) committed by this run and all "
            "earlier ones are intact: fix the cause and run the same command again to resume")
