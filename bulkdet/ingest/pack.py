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
from bulkdet.store.lock import FolderLock
from bulkdet.store.manifest import ensure_dataset_id, manifest_path, read_manifest, write_manifest
from bulkdet.store.shards import ShardWriter, existing_shards, shard_keys


@dataclass
class Entry:
    """One thing found under the source: a file to read, or a row to record as it is."""

    abspath: str  # os path (str with surrogate escapes for non-UTF-8 bytes)
    relpath: str  # printable relative path for the manifest
    status: str | None = None  # set when the entry can't be read as a file
    error: str | None = None


@dataclass
class PackSummary:
    found: int = 0
    new: int = 0
    stored_bytes: int = 0
    duplicates: int = 0
    by_status: Counter = field(default_factory=Counter)
    shards: int = 0
    map_growths: int = 0


def printable(path: str) -> str:
    """A UTF-8 string for any OS path: bytes that are not UTF-8 become \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk(src: Path, follow_symlinks: bool = False) -> Iterator[Entry]:
    """Every file under `src`, sorted; entries that can't be read become status rows.

    Symbolic links are recorded but not followed unless asked; when followed, a directory
    already visited (a loop, or the same directory twice) is recorded and not walked again.
    """
    src = os.path.abspath(src)
    root = os.stat(src)
    visited = {(root.st_dev, root.st_ino)}
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
        subfolders = []
        for e in entries:
            rel = printable(os.path.relpath(e.path, src))
            try:
                if e.is_symlink() and not follow_symlinks:
                    yield Entry(e.path, rel, "skipped", "symbolic link not followed (use --follow-symlinks)")
                    continue
                try:
                    st = os.stat(e.path)  # follows the link when there is one
                except FileNotFoundError:
                    yield Entry(e.path, rel, "read_error", "dangling symbolic link")
                    continue
                except OSError as exc:  # e.g. ELOOP for a link to itself
                    yield Entry(e.path, rel, "read_error", f"cannot stat: {exc.strerror}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in visited:
                        yield Entry(e.path, rel, "skipped", "symbolic link loop or folder already visited")
                        continue
                    visited.add((st.st_dev, st.st_ino))
                    subfolders.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    yield Entry(e.path, rel)
                else:
                    yield Entry(e.path, rel, "unsupported", "not a regular file")
            except OSError as exc:
                yield Entry(e.path, rel, "read_error", str(exc))
        stack.extend(reversed(subfolders))


def _read_and_sniff(entry: Entry, max_pixels: int) -> dict:
    """Read one file, hash it and read its header; never raises."""
    row = {"path": entry.relpath, "shard": -1, "key": None, "bytes": None, "format": None,
           "width": None, "height": None, "orientation": None, "status": entry.status, "error": entry.error}
    if entry.status is not None:
        return row
    try:
        with open(entry.abspath, "rb") as f:
            data = f.read()
    except OSError as exc:
        row.update(status="read_error", error=f"cannot read file: {exc.strerror or exc}")
        return row
    row["bytes"] = len(data)
    try:
        info = sniff(data, max_pixels)
    except ImageError as exc:
        row.update(status=exc.status, error=str(exc))
        return row
    row.update(key=hashlib.sha256(data).digest(), format=info.format, width=info.width,
               height=info.height, orientation=info.orientation, status="ok", data=data)
    return row


def ordered_map(pool: ThreadPoolExecutor, fn, items, window: int):
    """pool.map with at most `window` results in flight, so memory does not grow with input."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def pack(src: Path, out: Path, shard_size_mb: float = 1024, follow_symlinks: bool = False,
         max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 8, quiet: bool = False) -> PackSummary:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    with FolderLock(out, "pack"):  # two packs into one dataset would lose each other's files
        ensure_dataset_id(out)
        return _pack(src, out, shard_size_mb, follow_symlinks, max_pixels, threads, quiet)


def _pack(src: Path, out: Path, shard_size_mb: float, follow_symlinks: bool, max_pixels: int, threads: int,
          quiet: bool) -> PackSummary:
    shards_dir = out / "shards"
    old_rows = read_manifest(out).to_pylist() if manifest_path(out).exists() else []
    known_paths = {r["path"] for r in old_rows}
    # Keys already stored, from the manifest and from shards a killed pack left behind.
    stored: dict[bytes, int] = {r["key"]: r["shard"] for r in old_rows if r["shard"] >= 0}
    shards = existing_shards(shards_dir)
    for shard, path in shards.items():
        for key in shard_keys(path):
            stored.setdefault(key, shard)
    next_id = max((r["image_id"] for r in old_rows), default=-1) + 1

    entries = [e for e in walk(src, follow_symlinks) if e.relpath not in known_paths]
    summary = PackSummary(found=len(known_paths) + len(entries), new=len(entries))
    writer = ShardWriter(shards_dir, max(shards, default=-1) + 1, int(shard_size_mb * (1 << 20)))
    rows = old_rows
    bar = tqdm(total=len(entries), unit="file", desc="pack", disable=quiet, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for row in ordered_map(pool, lambda e: _read_and_sniff(e, max_pixels), entries, 4 * threads):
                data = row.pop("data", None)
                if data is not None:
                    if row["key"] in stored:
                        summary.duplicates += 1
                    else:
                        stored[row["key"]] = writer.put(row["key"], data)
                        summary.stored_bytes += len(data)
                    row["shard"] = stored[row["key"]]
                row["image_id"] = next_id
                next_id += 1
                rows.append(row)
                summary.by_status[row["status"]] += 1
                bar.update(1)
                bar.set_postfix(MB_s=f"{summary.stored_bytes / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f}",
                                failed=sum(n for s, n in summary.by_status.items() if s != "ok"), refresh=False)
    finally:
        bar.close()
        writer.close()  # commits what was stored, so a re-run after a crash reuses it
    summary.map_growths = writer.map_growths
    write_manifest(out, rows)
    summary.shards = len(existing_shards(shards_dir))
    return summary
