"""The run folder's one owner: open, commit parts, finish. The only module that writes one.

Lifecycle (`RunFolder.open` ... `finish` / `fail`):

1. open: refuse a folder that is neither empty nor a bulkdet run (a user's folder is never
   written into, let alone cleaned); take the folder's lock (store/lock.py: one writer at a
   time); compare the run's identity (model, settings, dataset) with fingerprint.json, refusing
   another run's folder unless --overwrite, which removes only files a run writes; repair what a
   kill left (temporary files, a detections part without its images part, a torn journal line,
   committed parts that no longer read back) and load the committed image ids (resume).
2. start: run.json says `running`.
3. commit parts (PartWriter): detections part, then images part (the commit marker), each
   written to a temporary name, fsynced and renamed, then a journal line.
4. finish: totals counted from the committed parts, run.json `complete`. Any exception instead
   ends run.json as `failed` or `interrupted` with the reason. The lock goes with the process.

Ray workers write parts into the driver's open folder (`RunFolder(path)`, no lock of their
own: the driver holds it) and redo a shard with `resume_shard`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulkdet.store.atomic import TMP_SUFFIX, fsync_dir, write_json_atomic, write_parquet_atomic
from bulkdet.store.lock import LOCK_NAME, FolderLock
from bulkdet.store.manifest import PROCESSED_STATUSES
from bulkdet.store.parts import (EVAL, DETECTIONS_DIR, DETECTIONS_SCHEMA, FINGERPRINT, IMAGES_DIR, IMAGES_SCHEMA,
                                 JOURNAL, METRICS, PART_RE, RUN_JSON, committed_ids, count_results,
                                 detections_parts, images_parts, is_run_folder, part_label, part_name)

log = logging.getLogger("bulkdet")

RUN_FILES = (RUN_JSON, FINGERPRINT, JOURNAL, METRICS, EVAL)  # besides the parts and the lock


class RunFolderRefused(RuntimeError):
    """The command conflicts with what --out holds (a usage error: exit 2)."""


class ConfigMismatch(RunFolderRefused):
    pass


class PartWriteError(RuntimeError):
    """Writing a part failed (disk full, I/O error); committed parts are intact."""


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: set[int] = set()  # image ids committed (for resume)
        self.run_json: dict = {}
        self._lock: FolderLock | None = None

    # ------------------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: Path, identity: dict, overwrite: bool = False) -> "RunFolder":
        folder = cls(path)
        folder._refuse_foreign()
        folder.path.mkdir(parents=True, exist_ok=True)
        folder._lock = FolderLock(folder.path, "run").acquire()
        try:
            if overwrite:
                folder._remove_run_files()
            folder._check_identity(identity)
            for name in (IMAGES_DIR, DETECTIONS_DIR):
                (folder.path / name).mkdir(exist_ok=True)
            folder._repair()
            folder.done = committed_ids(folder.path)
        except BaseException:
            folder._release()
            raise
        return folder

    def _refuse_foreign(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunFolderRefused(f"--out {self.path} is a file, not a folder: choose a new or empty folder")
        foreign = [p.name for p in self.path.iterdir() if not self._ours(p)]
        if foreign and not is_run_folder(self.path):
            raise RunFolderRefused(
                f"--out {self.path} holds files that are not a bulkdet run ({', '.join(sorted(foreign)[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder")

    def _ours(self, p: Path) -> bool:
        """A name a run writes at the top of its folder (a run that died before run.json has only these)."""
        name = p.name.removesuffix(TMP_SUFFIX)
        if p.is_dir():
            return name in (IMAGES_DIR, DETECTIONS_DIR) and all(PART_RE.match(q.name.removesuffix(TMP_SUFFIX))
                                                               for q in p.iterdir())
        return name in RUN_FILES or name == LOCK_NAME

    def _remove_run_files(self) -> None:
        """--overwrite: remove what a run writes, nothing else (a user's file in the folder stays)."""
        for sub in (IMAGES_DIR, DETECTIONS_DIR):
            folder = self.path / sub
            for p in folder.glob("part-*"):
                if PART_RE.match(p.name.removesuffix(TMP_SUFFIX)):
                    p.unlink()
        for name in RUN_FILES:
            for p in (self.path / name, self.path / (name + TMP_SUFFIX)):
                p.unlink(missing_ok=True)

    def _check_identity(self, identity: dict) -> None:
        """fingerprint.json must match, unless no detection depends on it yet: a start that failed
        before its first batch was committed must not block the corrected command (the rows of
        files that failed at pack, which it may have written, are simply written again)."""
        path = self.path / FINGERPRINT
        identity = json.loads(json.dumps(identity))  # as stored: e.g. int dict keys become strings
        previous = json.loads(path.read_text()) if path.is_file() else identity
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if changed:
            unstored = f"part-{part_label(-1)}-"
            if any(not p.name.startswith(unstored) for p in images_parts(self.path)):
                raise ConfigMismatch(
                    f"{self.path} holds a run with different {', '.join(changed)}; "
                    "use --overwrite to replace its results, or another --out")
            for p in images_parts(self.path):
                self._drop_part(p.name)
        if changed or not path.is_file():
            write_json_atomic(identity, path)

    def _repair(self) -> None:
        """After a kill: temporary files and uncommitted detections parts go; parts that no longer
        read back are dropped so their images are processed again; the journal is completed."""
        for sub in (IMAGES_DIR, DETECTIONS_DIR):
            for tmp in (self.path / sub).glob(f"part-*{TMP_SUFFIX}"):
                tmp.unlink()
        for name in RUN_FILES:
            (self.path / (name + TMP_SUFFIX)).unlink(missing_ok=True)
        committed = {p.name for p in images_parts(self.path)}
        for p in detections_parts(self.path):
            if p.name not in committed:
                p.unlink()
        for name in sorted(committed):
            problem = self._check_part(name)
            if problem:
                log.warning("%s: %s; its images will be processed again", name, problem)
                self._drop_part(name)
                committed.discard(name)
                self._journal({"part": name, "dropped_broken": problem})
        self._repair_journal(committed)

    def _check_part(self, name: str) -> str | None:
        """Why a committed part pair is broken (unreadable, or rows that do not match), else None."""
        try:
            n_det = pq.read_table(self.path / IMAGES_DIR / name, columns=["n_det"]).column("n_det")
            detections = pq.read_metadata(self.path / DETECTIONS_DIR / name).num_rows
        except (OSError, pa.ArrowException) as exc:
            return f"cannot be read ({exc})"
        expected = int(pc.sum(n_det).as_py() or 0)
        if detections != expected:
            return f"holds {detections} detections where its images count {expected}"
        return None

    def _drop_part(self, name: str) -> None:
        (self.path / IMAGES_DIR / name).unlink(missing_ok=True)  # the marker first: no half commit
        (self.path / DETECTIONS_DIR / name).unlink(missing_ok=True)
        fsync_dir(self.path / IMAGES_DIR)

    def _repair_journal(self, committed: set[str]) -> None:
        """End a torn last line, and record parts committed after the last entry (the images
        part is the commit; its journal line follows, so a kill in between leaves it unlogged)."""
        path = self.path / JOURNAL
        text = path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
        logged = set()
        for line in text.splitlines():
            try:
                logged.add(json.loads(line)["part"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line: its part, if committed, is recovered below
        if text and not text.endswith("\n"):
            with open(path, "a") as journal:
                journal.write("\n")
        for name in sorted(committed - logged):
            images = pq.read_metadata(self.path / IMAGES_DIR / name).num_rows
            self._journal({"part": name, "images": images, "recovered": True})

    def _journal(self, entry: dict) -> None:
        with open(self.path / JOURNAL, "a") as journal:
            journal.write(json.dumps({**entry, "time": time.time()}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())

    # ------------------------------------------------------------------------- resume

    def drop_failed_rows(self, retryable_ids: set[int]) -> set[int]:
        """--retry-failed: remove the failed rows of these images from their committed parts
        (a `corrupt` row is not failed: it has its detections).

        Each affected images part is rewritten atomically without those rows (a part left with
        no rows is removed, images part first); the images are then no longer committed and the
        run processes them again. A kill at any point leaves each image in at most one part.
        Failed images have no detections, so detections parts stay as they are.
        """
        dropped: set[int] = set()
        ids = pa.array(sorted(retryable_ids), pa.int64())
        for part in images_parts(self.path):
            table = pq.read_table(part)
            failed = pc.invert(pc.is_in(table.column("status"), pa.array(PROCESSED_STATUSES)))
            drop = pc.and_(failed, pc.is_in(table.column("image_id"), ids))
            n = int(pc.sum(drop).as_py() or 0)
            if not n:
                continue
            dropped.update(table.filter(drop).column("image_id").to_pylist())
            if n == len(table):
                self._drop_part(part.name)
            else:
                write_parquet_atomic(table.filter(pc.invert(drop)), part, compression="zstd")
            self._journal({"part": part.name, "retry_dropped": n})
        self.done -= dropped
        return dropped

    def resume_shard(self, shard: int) -> set[int]:
        """Image ids of one shard already committed, after removing that shard's leftovers.

        For redoing a shard whose worker died while other workers go on writing other shards:
        only this shard's temporary files and uncommitted detections parts are touched.
        """
        pattern = f"part-{part_label(shard)}-*.parquet"
        for sub in (IMAGES_DIR, DETECTIONS_DIR):
            for tmp in (self.path / sub).glob(pattern + TMP_SUFFIX):
                tmp.unlink(missing_ok=True)
        committed = sorted((self.path / IMAGES_DIR).glob(pattern))
        names = {p.name for p in committed}
        for p in (self.path / DETECTIONS_DIR).glob(pattern):
            if p.name not in names:
                p.unlink(missing_ok=True)
        return {i for p in committed for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist()}

    # ----------------------------------------------------------------- write and end

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def writer(self, names: dict[int, str], metadata: dict, commit_images: int = 4096) -> "PartWriter":
        return PartWriter(self.path, names, metadata, commit_images)

    def start(self, run_json: dict) -> None:
        self.run_json = {**run_json, "state": "running"}
        write_json_atomic(self.run_json, self.path / RUN_JSON)

    def update(self, **fields) -> None:
        self.run_json.update(fields)
        write_json_atomic(self.run_json, self.path / RUN_JSON)

    def totals(self) -> dict:
        return count_results(self.path)

    def finish(self, **fields) -> None:
        self.update(state="complete", finished=time.time(), **fields)

    def fail(self, exc: BaseException) -> None:
        """run.json ends `interrupted` (Ctrl-C) or `failed`, with the reason; never left `running`."""
        if not self.run_json or self.run_json.get("state") != "running":
            return
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            self.update(state=state, finished=time.time(), error=f"{type(exc).__name__}: {exc}")
        except OSError as write_error:  # e.g. the disk is full: the original error is the one to report
            log.warning("could not record the %s state in %s: %s", state, self.path / RUN_JSON, write_error)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None:
                self.fail(exc)
        finally:
            self._release()


class PartWriter:
    """Buffers rows and commits them as numbered parts every `commit_images` images.

    Used as a context manager: leaving it commits the rows still buffered (complete results, so
    a re-run resumes after them), unless a write already failed.
    """

    def __init__(self, run_dir: Path, names: dict[int, str], metadata: dict, commit_images: int = 4096):
        self.run_dir = Path(run_dir)
        self.names = names
        self.metadata = {k: str(v) for k, v in metadata.items()}
        self.commit_images = commit_images
        self.next_seq: dict[str, int] = {}  # part label -> next sequence number
        for p in images_parts(run_dir):
            label, seq = PART_RE.match(p.name).groups()
            self.next_seq[label] = max(self.next_seq.get(label, 0), int(seq) + 1)
        self.shard: int | None = None  # shard of the rows buffered now
        self.journal = open(self.run_dir / JOURNAL, "a")
        self._images: list[pa.Table] = []
        self._detections: list[pa.Table] = []
        self.buffered = 0
        self.committed_parts = 0
        self.broken = False  # a write failed: buffered rows are not retried at close

    def add_images(self, shard: int, image_ids, paths, width, height, status, error,
                   detections: list):
        """One row per image; `detections[i]` (boxes, scores, class_ids) is None for an image that failed.

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

    def add_unstored(self, rows: pa.Table) -> None:
        """Images that failed at pack have no bytes to process: their manifest rows go out as they are."""
        if len(rows):
            self.add_images(-1, rows.column("image_id").to_pylist(), rows.column("path").to_pylist(),
                            rows.column("width").to_pylist(), rows.column("height").to_pylist(),
                            rows.column("status").to_pylist(), rows.column("error").to_pylist(), [None] * len(rows))

    def _detections_table(self, image_ids, paths, detections, n_det) -> pa.Table:
        dets = [d for d in detections if d is not None and len(d)]
        rows = np.repeat(np.arange(len(n_det)), n_det)
        boxes = np.concatenate([d.boxes for d in dets])
        class_ids = np.concatenate([d.class_ids for d in dets]).astype(np.int16)
        present = np.unique(class_ids)
        names = [self.names.get(int(c), str(int(c))) for c in present]
        class_name = pa.DictionaryArray.from_arrays(
            pa.array(np.searchsorted(present, class_ids).astype(np.int16)), pa.array(names, pa.string()))
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
        label = part_label(self.shard)
        seq = self.next_seq.get(label, 0)
        name = part_name(self.shard, seq)
        meta = {**self.metadata, "bulkdet.part": name}
        images = pa.concat_tables(self._images)
        dets = (pa.concat_tables(self._detections).unify_dictionaries() if self._detections
                else DETECTIONS_SCHEMA.empty_table())
        failed = int(pc.sum(pc.not_equal(images.column("status"), "ok")).as_py() or 0)
        target = self.run_dir / DETECTIONS_DIR / name
        try:
            # Detections first: the images part is the commit marker (see module docstring).
            write_parquet_atomic(dets.replace_schema_metadata(meta), target, compression="zstd")
            target = self.run_dir / IMAGES_DIR / name
            write_parquet_atomic(images.replace_schema_metadata(meta), target, compression="zstd")
            target = self.run_dir / JOURNAL
            self.journal.write(json.dumps({"part": name, "images": len(images), "failed": failed,
                                           "detections": len(dets), "time": time.time()}) + "\n")
            self.journal.flush()
            os.fsync(self.journal.fileno())
        except OSError as exc:
            self.broken = True
            raise PartWriteError(_write_error_message(exc, target, self.committed_parts)) from exc
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

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except PartWriteError:
            if exc is None:
                raise
            # the error that stopped the run is the one to report; this one says the same disk is full


def _write_error_message(exc: OSError, path: Path, committed_parts: int) -> str:
    disk_full = exc.errno == errno.ENOSPC or "no space left" in str(exc).lower()  # Arrow's OSError has no errno
    what = "disk full (no space left on device)" if disk_full else (exc.strerror or str(exc))
    return (f"{what} while writing {path}; the {committed_parts} part(s) committed by this run and all "
            "earlier ones are intact: fix the cause and run the same command again to resume")
