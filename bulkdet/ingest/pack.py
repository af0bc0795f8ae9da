"""`bulkdet pack`: walk a source folder, store encoded bytes in LMDB shards, write the manifest."""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from bulkdet.ingest.imageinfo import DEFAULT_MAX_PIXELS, ImageError, sniff
from bulkdet.ingest.integrity import structure_problem
from bulkdet.store.lock import LOCK_NAME, FolderLock
from bulkdet.store.manifest import (MANIFEST_NAME, PROCESSED_STATUSES, RETIRED_STATUSES, ensure_dataset_id,
                                    manifest_path, read_manifest, record_source, write_manifest)
from bulkdet.store.shards import ShardWriter, existing_shards, shard_keys


HEADER_BYTES = 64 << 10  # read first: a file is read further only when this shows an image
READ_BUDGET = 256 << 20  # file bytes in flight at once (a larger file goes alone)
# A bulkdet dataset or run folder (never packed as images) holds bulkdet's lock file, or all
# of one of these sets (those made before the lock existed).
BULKDET_MARKERS = ({LOCK_NAME}, {MANIFEST_NAME, "shards"}, {"run.json", "fingerprint.json"})


class PackUsageError(ValueError):
    """The command can't be done as given (e.g. --out is the source folder)."""


@dataclass
class Entry:
    """One thing found under the source: a file to read, or a row to record as it is."""

    abspath: str  # os path (str with surrogate escapes for non-UTF-8 bytes)
    relpath: str  # printable relative path for the manifest
    status: str | None = None  # set when the entry can't be read as a file
    error: str | None = None
    size: int | None = None  # from the walk's stat (the link's target for a link)
    mtime_ns: int | None = None


@dataclass
class WalkNotes:
    """What the walk passed over without a row: said in pack's summary."""

    folder_links: list[str] = field(default_factory=list)  # links to folders, not followed
    bulkdet_folders: list[str] = field(default_factory=list)  # datasets and run folders (--out among them)


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
    duplicates: int = 0
    by_status: Counter = field(default_factory=Counter)  # of the rows added by this pack
    shards: int = 0
    map_growths: int = 0
    notes: WalkNotes = field(default_factory=WalkNotes)
    previous_source: str | None = None  # when the last pack read another folder


def printable(path: str) -> str:
    """A UTF-8 string for any OS path: bytes that are not UTF-8 become \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_bulkdet_folder(names: set[str]) -> bool:
    return any(markers <= names for markers in BULKDET_MARKERS)


def walk(src: Path, follow_symlinks: bool = False, exclude: Path | None = None,
         notes: WalkNotes | None = None) -> Iterator[Entry]:
    """Every file under `src`, sorted; entries that can't be read become status rows.

    A link to a file is a file (its target's bytes, under the link's path); a dangling link
    is a read_error. Folders behind links are walked only with `follow_symlinks`; a folder
    already visited (a loop) is not walked again. A folder is never a row. `exclude` (the
    output folder) and any bulkdet dataset or run folder below `src` are not walked.
    """
    notes = notes if notes is not None else WalkNotes()
    src = os.path.abspath(src)
    root = os.stat(src)
    visited = {(root.st_dev, root.st_ino)}
    if exclude is not None and os.path.isdir(exclude):
        st = os.stat(exclude)
        visited.add((st.st_dev, st.st_ino))
        if os.path.abspath(exclude).startswith(src + os.sep):
            notes.bulkdet_folders.append(printable(os.path.relpath(exclude, src)))
    stack = [src]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Entry(folder, printable(os.path.relpath(folder, src)), "read_error",
                        f"cannot list folder: {exc.strerror}")
            continue
        if folder != src and _is_bulkdet_folder({e.name for e in entries}):
            notes.bulkdet_folders.append(printable(os.path.relpath(folder, src)))
            continue
        subfolders = []
        for e in entries:
            rel = printable(os.path.relpath(e.path, src))
            try:
                is_link = e.is_symlink()
                try:
                    st = os.stat(e.path)  # follows the link when there is one
                except FileNotFoundError:
                    yield Entry(e.path, rel, "read_error",
                                "dangling symbolic link" if is_link else "file vanished while packing")
                    continue
                except OSError as exc:  # e.g. ELOOP for a link to itself
                    yield Entry(e.path, rel, "read_error", f"cannot stat: {exc.strerror}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if is_link and not follow_symlinks:
                        notes.folder_links.append(rel)
                    elif (st.st_dev, st.st_ino) not in visited:  # else a loop, or --out
                        visited.add((st.st_dev, st.st_ino))
                        subfolders.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    yield Entry(e.path, rel, size=st.st_size, mtime_ns=st.st_mtime_ns)
                else:
                    yield Entry(e.path, rel, "unsupported", "not a regular file")
            except OSError as exc:
                yield Entry(e.path, rel, "read_error", str(exc))
        stack.extend(reversed(subfolders))


def _read_and_sniff(entry: Entry, max_pixels: int) -> dict:
    """Read one file's header, and all its bytes when it is an image (hashed, structure
    checked); never raises. A file that is no usable image is read no further than its header.
    """
    row = {"path": entry.relpath, "shard": -1, "key": None, "bytes": entry.size, "format": None,
           "width": None, "height": None, "orientation": None, "status": entry.status, "error": entry.error,
           "mtime_ns": entry.mtime_ns}
    if entry.status is not None:
        return row
    try:
        with open(entry.abspath, "rb") as f:
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


def pack(src: Path, out: Path, shard_size_mb: float = 1024, follow_symlinks: bool = False,
         max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 8, quiet: bool = False,
         read_budget: int = READ_BUDGET) -> PackSummary:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    if out.resolve() == src.resolve():
        raise PackUsageError(f"--out {out} is the source folder itself: give the dataset its own folder "
                             "(one inside the source is fine, it is not packed)")
    with FolderLock(out, "pack"):  # two packs into one dataset would lose each other's files
        ensure_dataset_id(out)
        summary = _pack(src, out, shard_size_mb, follow_symlinks, max_pixels, threads, quiet, read_budget)
        previous = record_source(out, src)
        if previous is not None and previous != str(src.resolve()):
            summary.previous_source = previous
        return summary


# Fields that must match for a re-read file to keep its row (and image_id).
_OUTCOME = ("status", "error", "key", "format", "width", "height", "orientation")


def _unchanged(old: dict, entry: Entry) -> bool:
    """Whether the file needs no new read: same size and mtime, and its bytes still stored."""
    if entry.status is not None:  # not readable as a file (now and maybe before)
        return (old["status"], old["error"]) == (entry.status, entry.error)
    return (old["bytes"], old["mtime_ns"]) == (entry.size, entry.mtime_ns) and (
        old["status"] not in PROCESSED_STATUSES or old["shard"] >= 0)


def _pack(src: Path, out: Path, shard_size_mb: float, follow_symlinks: bool, max_pixels: int, threads: int,
          quiet: bool, read_budget: int) -> PackSummary:
    shards_dir = out / "shards"
    old_rows = read_manifest(out).to_pylist() if manifest_path(out).exists() else []
    # Keys really stored: in the shards (a killed pack's committed ones too; a damaged shard's
    # none, so its images are stored again). A row's shard says where its bytes are, or -1.
    stored: dict[bytes, int] = {}
    shards = existing_shards(shards_dir)
    for shard, path in shards.items():
        for key in shard_keys(path):
            stored.setdefault(key, shard)
    for r in old_rows:
        if r["shard"] >= 0:
            r["shard"] = stored.get(r["key"], -1)
    next_id = max((r["image_id"] for r in old_rows), default=-1) + 1

    # Re-pack: a path already in the manifest keeps its row when its size and mtime are the
    # same, or when it reads back the same (content hash); a changed file gets a new row and
    # image_id (so a run processes it again) and its old row is `replaced`; a file gone is `deleted`.
    summary = PackSummary()
    active = {r["path"]: r for r in old_rows if r["status"] not in RETIRED_STATUSES}
    todo: list[tuple[Entry, dict | None]] = []
    for entry in walk(src, follow_symlinks, out, summary.notes):
        old = active.pop(entry.relpath, None)
        if old is not None and _unchanged(old, entry):
            summary.unchanged += 1
        else:
            todo.append((entry, old))
    summary.found = summary.unchanged + len(todo)

    writer = ShardWriter(shards_dir, max(shards, default=-1) + 1, int(shard_size_mb * (1 << 20)))
    new_rows = []
    bar = tqdm(total=len(todo), unit="file", desc="pack", disable=quiet, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(threads) as pool:
            rows = ordered_map(pool, lambda e: _read_and_sniff(e, max_pixels), (e for e, _ in todo), 4 * threads,
                               cost=lambda e: e.size or 0, budget=read_budget)
            for (entry, old), row in zip(todo, rows):
                data = row.pop("data", None)
                if data is not None:
                    if row["key"] in stored:
                        summary.duplicates += 1
                    else:
                        stored[row["key"]] = writer.put(row["key"], data)
                        summary.stored_bytes += len(data)
                    row["shard"] = stored[row["key"]]
                bar.update(1)
                if old is not None and all(old[k] == row[k] for k in _OUTCOME):  # touched, or bytes lost
                    summary.restored += old["status"] in PROCESSED_STATUSES and old["shard"] < 0
                    summary.unchanged += 1
                    old.update(bytes=row["bytes"], mtime_ns=row["mtime_ns"], shard=row["shard"])
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
                bar.set_postfix(MB_s=f"{summary.stored_bytes / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f}",
                                failed=sum(n for s, n in summary.by_status.items() if s != "ok"), refresh=False)
    finally:
        bar.close()
        writer.close()  # commits what was stored, so a re-run after a crash reuses it
    moved_to = {r["key"]: r for r in new_rows if r["key"] is not None}
    for old in active.values():  # in the manifest, not in the source any more
        to = moved_to.get(old["key"]) if old["key"] is not None else None
        old.update(status="deleted", error="no longer in the source folder" + (
            f"; the same content is now {to['path']} (image_id {to['image_id']})" if to else ""))
        summary.deleted += 1
        summary.renamed += to is not None
    summary.map_growths = writer.map_growths
    write_manifest(out, old_rows + new_rows)
    summary.shards = len(existing_shards(shards_dir))
    return summary
