"""`bulkdet pack`: read a source (ingest/sources.py), store encoded bytes in LMDB shards (or,
with --reference, only where they are), write the manifest."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bulkdet.ingest.imageinfo import DEFAULT_MAX_PIXELS, ImageError, sniff
from bulkdet.ingest.integrity import structure_problem
from bulkdet.ingest.sources import Entry, PackUsageError, Source, WalkNotes, open_source
from bulkdet.store.lock import FolderLock
from bulkdet.store.manifest import (PROCESSED_STATUSES, RETIRED_STATUSES, ensure_dataset_id, manifest_path,
                                    read_manifest, record_source, write_manifest)
from bulkdet.store.readers import dataset_info
from bulkdet.store.shards import ShardWriter, existing_shards, shard_keys


HEADER_BYTES = 64 << 10  # read first: a file is read further only when this shows an image
READ_BUDGET = 256 << 20  # file bytes in flight at once (a larger file goes alone)


@dataclass
class PackSummary:
    found: int = 0  # files in the source now
    new: int = 0  # paths not in the manifest before
    changed: int = 0  # content changed: a new row (new image_id), the old one `replaced`
    deleted: int = 0  # rows whose file is gone: marked `deleted`
    renamed: int = 0  # ...of which the same content is now under a new path
    unchanged: int = 0
    restored: int = 0  # unchanged files whose stored bytes were lost (damaged shard): stored again
    stored_bytes: int = 0
    read_bytes: int = 0  # read from the source (what MB/s counts)
    duplicates: int = 0
    by_status: Counter = field(default_factory=Counter)  # of the rows added by this pack
    shards: int = 0
    map_growths: int = 0
    notes: WalkNotes = field(default_factory=WalkNotes)
    previous_source: str | None = None  # when the last pack read another folder


class ReferenceGroups:
    """pack --reference: stores nothing, numbers rows in pseudo-shards of about `shard_bytes` of
    source bytes (ShardWriter's `put` without the writing), so that a run's unit of work, resume
    and Ray split (by shard) stay what they are for copied datasets."""

    map_growths = 0

    def __init__(self, first_shard: int, shard_bytes: int):
        self.shard, self.shard_bytes, self.bytes_in_shard = first_shard, shard_bytes, 0

    def put(self, key: bytes, value: bytes) -> int:
        if self.bytes_in_shard and self.bytes_in_shard + len(value) > self.shard_bytes:
            self.shard, self.bytes_in_shard = self.shard + 1, 0
        self.bytes_in_shard += len(value)
        return self.shard

    def close(self) -> None:
        pass


def _read_and_sniff(source: Source, entry: Entry, max_pixels: int) -> dict:
    """Read one file's header, and all its bytes when it is an image (hashed, structure
    checked); never raises. A file that is no usable image is read no further than its header.
    """
    row = {"path": entry.relpath, "shard": -1, "key": None, "bytes": entry.size, "format": None,
           "width": None, "height": None, "orientation": None, "status": entry.status, "error": entry.error,
           "mtime_ns": entry.mtime_ns, "offset": entry.offset}
    if entry.status is not None:
        return row
    try:
        with source.open(entry) as f:
            data = f.read(HEADER_BYTES)
            whole = len(data) < HEADER_BYTES
            if not whole:
                f.seek(0)
            info = sniff(data if whole else f, max_pixels)  # from a file: reads the header only
            if not whole:
                f.seek(0)
                data = f.read()
    except ImageError as exc:
        row.update(status=exc.status, error=str(exc))
        return row
    except OSError as exc:
        row.update(status="read_error", error=f"cannot read file: {exc.strerror or exc}")
        return row
    problem = structure_problem(data, info.format)
    row.update(key=hashlib.sha256(data).digest(), bytes=len(data), format=info.format, width=info.width,
               height=info.height, orientation=info.orientation, status="corrupt" if problem else "ok",
               error=problem, data=data)
    return row


def ordered_map(pool: ThreadPoolExecutor, fn, items, window: int, cost=lambda item: 0, budget: int = 0):
    """pool.map with at most `window` results in flight and, when `budget` is set, at most
    `budget` of `cost` (bytes) in flight (a larger item runs alone), so memory does not grow
    with the input. An item's cost counts until the caller asks for the next result.
    """
    pending = deque()
    in_flight = 0
    for item in items:
        c = cost(item)
        while pending and (len(pending) >= window or (budget and in_flight + c > budget)):
            future, done_cost = pending.popleft()
            yield future.result()
            in_flight -= done_cost
        pending.append((pool.submit(fn, item), c))
        in_flight += c
    while pending:
        yield pending.popleft()[0].result()


def pack(src, out: Path, shard_size_mb: float = 1024, follow_symlinks: bool = False,
         max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 8, quiet: bool = False,
         read_budget: int = READ_BUDGET, reference: bool = False, storage_options: dict | None = None) -> PackSummary:
    """Pack SRC (a folder, a list of paths, a tar archive or a URL) into the dataset `out`."""
    out = Path(out)
    if not isinstance(src, str) or "://" not in src:
        src = Path(src)
        if src.is_dir() and out.resolve() == src.resolve():
            raise PackUsageError(f"--out {out} is the source folder itself: give the dataset its own folder "
                                 "(one inside the source is fine, it is not packed)")
    source = open_source(src, storage_options, follow_symlinks, out)
    try:
        if reference and source.kind == "tar" and source.compressed:
            raise PackUsageError(f"--reference needs an uncompressed tar: a member of {src} can't be read at an "
                                 "offset; decompress it (gunzip) or pack it by copy")
        with FolderLock(out, "pack"):  # two packs into one dataset would lose each other's files
            described = {**source.description(), "reference": reference}
            _check_repack(out, described)
            ensure_dataset_id(out)
            summary = _pack(source, out, shard_size_mb, max_pixels, threads, quiet, read_budget, reference)
            previous = record_source(out, described)
            if previous is not None and previous != described["source"]:
                summary.previous_source = previous
            return summary
    finally:
        source.close()


def _check_repack(out: Path, described: dict) -> None:
    """A dataset keeps its way of packing; one packed by reference also keeps its source (its
    rows are read from there by every run)."""
    if not manifest_path(out).exists():
        return
    info = dataset_info(out)
    if bool(info.get("reference")) != described["reference"]:
        how = "by reference" if info.get("reference") else "by copy"
        raise PackUsageError(f"{out} was packed {how}: pack again the same way, or into a new --out")
    if described["reference"] and (info.get("source"), info.get("source_kind")) != (
            described["source"], described["source_kind"]):
        raise PackUsageError(f"{out} was packed by reference from {info.get('source')}: its rows are read from "
                             "there; pack this source into a new --out")


# Fields that must match for a re-read file to keep its row (and image_id).
_OUTCOME = ("status", "error", "key", "format", "width", "height", "orientation")


def _unchanged(old: dict, entry: Entry) -> bool:
    """Whether the file needs no new read: same size, mtime (and tar offset), and its bytes still stored."""
    if entry.status is not None:  # not readable as a file (now and maybe before)
        return (old["status"], old["error"]) == (entry.status, entry.error)
    return (old["bytes"], old["mtime_ns"], old["offset"]) == (entry.size, entry.mtime_ns, entry.offset) and (
        old["status"] not in PROCESSED_STATUSES or old["shard"] >= 0)


def _pack(source: Source, out: Path, shard_size_mb: float, max_pixels: int, threads: int,
          quiet: bool, read_budget: int, reference: bool) -> PackSummary:
    shards_dir = out / "shards"
    old_rows = read_manifest(out).to_pylist() if manifest_path(out).exists() else []
    # Keys really stored: in the shards (a killed pack's committed ones too; a damaged shard's
    # none, so its images are stored again). A row's shard says where its bytes are, or -1.
    # By reference nothing is stored: a row's (pseudo-)shard stays.
    stored: dict[bytes, int] = {}
    shards = existing_shards(shards_dir) if not reference else {r["shard"]: None for r in old_rows if r["shard"] >= 0}
    for shard, path in shards.items() if not reference else ():
        for key in shard_keys(path):
            stored.setdefault(key, shard)
    for r in old_rows if not reference else ():
        if r["shard"] >= 0:
            r["shard"] = stored.get(r["key"], -1)
    next_id = max((r["image_id"] for r in old_rows), default=-1) + 1

    # Re-pack: a path already in the manifest keeps its row when its size and mtime are the
    # same, or when it reads back the same (content hash); a changed file gets a new row and
    # image_id (so a run processes it again) and its old row is `replaced`; a file gone is `deleted`.
    summary = PackSummary()
    # A path may have more than one row (a tar naming a member twice): matched in order.
    active: dict[str, list[dict]] = {}
    for r in old_rows:
        if r["status"] not in RETIRED_STATUSES:
            active.setdefault(r["path"], []).append(r)
    todo: list[tuple[Entry, dict | None]] = []
    for entry in source.entries(summary.notes):
        same_path = active.get(entry.relpath)
        old = same_path.pop(0) if same_path else None
        if old is not None and _unchanged(old, entry):
            summary.unchanged += 1
        else:
            todo.append((entry, old))
    summary.found = summary.unchanged + len(todo)

    first, shard_bytes = max(shards, default=-1) + 1, int(shard_size_mb * (1 << 20))
    writer = ReferenceGroups(first, shard_bytes) if reference else ShardWriter(shards_dir, first, shard_bytes)
    threads = source.threads or threads
    new_rows = []
    bar = tqdm(total=len(todo), unit=source.unit, desc="pack", disable=quiet, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(threads) as pool:
            rows = ordered_map(pool, lambda e: _read_and_sniff(source, e, max_pixels), (e for e, _ in todo),
                               4 * threads, cost=lambda e: e.size or 0, budget=read_budget)
            for (entry, old), row in zip(todo, rows):
                data = row.pop("data", None)
                if data is not None:
                    summary.read_bytes += len(data)
                    if row["key"] in stored:
                        summary.duplicates += 1
                        row["shard"] = stored[row["key"]]
                    else:  # by reference: the row's pseudo-shard (its bytes stay in the source)
                        row["shard"] = writer.put(row["key"], data)
                        if not reference:
                            stored[row["key"]] = row["shard"]
                            summary.stored_bytes += len(data)
                bar.update(1)
                if old is not None and all(old[k] == row[k] for k in _OUTCOME):  # touched, or bytes lost
                    summary.restored += old["status"] in PROCESSED_STATUSES and old["shard"] < 0
                    summary.unchanged += 1
                    old.update(bytes=row["bytes"], mtime_ns=row["mtime_ns"], offset=row["offset"], shard=row["shard"])
                    continue
                row["image_id"] = next_id
                next_id += 1
                if old is None:
                    summary.new += 1
                else:
                    old.update(status="replaced", error=f"the file changed: see image_id {row['image_id']}")
                    summary.changed += 1
                new_rows.append(row)
                summary.by_status[row["status"]] += 1
                bar.set_postfix(MB_s=f"{summary.read_bytes / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f}",
                                failed=sum(n for s, n in summary.by_status.items() if s != "ok"), refresh=False)
    finally:
        bar.close()
        writer.close()  # commits what was stored, so a re-run after a crash reuses it
    moved_to = {r["key"]: r for r in new_rows if r["key"] is not None}
    for old in (r for rows in active.values() for r in rows):  # in the manifest, not in the source any more
        to = moved_to.get(old["key"]) if old["key"] is not None else None
        old.update(status="deleted", error="no longer in the source" + (
            f"; the same content is now {to['path']} (image_id {to['image_id']})" if to else ""))
        summary.deleted += 1
        summary.renamed += to is not None
    summary.map_growths = writer.map_growths
    write_manifest(out, old_rows + new_rows)
    summary.shards = len({r["shard"] for r in old_rows + new_rows if r["shard"] >= 0}) if reference else \
        len(existing_shards(shards_dir))
    return summary
