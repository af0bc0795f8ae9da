"""What `pack` reads: a folder, a list of paths, a tar archive, or an object-store URL.

Each source yields `Entry`s (a path for the manifest, size and mtime for re-pack's change
detection, or a status when the thing can't be read as a file) and opens an entry as a binary
file; pack.py reads every source the same way (header first, bounded bytes in flight, hash,
structure check). `open_source` picks the source from what SRC is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import io
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Iterator

from bulkdet.store.lock import LOCK_NAME
from bulkdet.store.manifest import MANIFEST_NAME
from bulkdet.store.readers import filesystem, is_url, public_options

# A bulkdet dataset or run folder (never packed as images) holds bulkdet's lock file, or all
# of one of these sets (those made before the lock existed).
BULKDET_MARKERS = ({LOCK_NAME}, {MANIFEST_NAME, "shards"}, {"run.json", "fingerprint.json"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_COMPRESSED_TAR = (".tar.gz", ".tgz")


class PackUsageError(ValueError):
    """The command can't be done as given (e.g. --out is the source folder)."""


@dataclass
class Entry:
    """One thing found in the source: a file to read, or a row to record as it is."""

    abspath: str  # where to open it: os path (str with surrogate escapes), member name, or object path
    relpath: str  # printable path for the manifest
    status: str | None = None  # set when the entry can't be read as a file
    error: str | None = None
    size: int | None = None  # from the walk's stat (the link's target for a link)
    mtime_ns: int | None = None
    offset: int | None = None  # a tar member's data offset in the archive


@dataclass
class WalkNotes:
    """What the walk passed over without a row: said in pack's summary."""

    folder_links: list[str] = field(default_factory=list)  # links to folders, not followed
    bulkdet_folders: list[str] = field(default_factory=list)  # datasets and run folders (--out among them)


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


class Source(ABC):
    """A source pack reads: its entries, how to open one, and what dataset.json records of it."""

    kind = ""
    unit = "file"  # progress unit
    threads: int | None = None  # reads in flight (None: pack's --threads)

    @abstractmethod
    def entries(self, notes: WalkNotes) -> Iterator[Entry]:
        """Every file (or object, or member) of the source, in a stable order."""

    def open(self, entry: Entry) -> BinaryIO:
        return open(entry.abspath, "rb")

    def description(self) -> dict:
        return {"source": self.name, "source_kind": self.kind}

    def close(self) -> None:
        pass


class DirectorySource(Source):
    kind = "directory"

    def __init__(self, path: Path, follow_symlinks: bool, exclude: Path | None):
        self.path, self.follow_symlinks, self.exclude = Path(path), follow_symlinks, exclude
        self.name = str(self.path.resolve())

    def entries(self, notes: WalkNotes) -> Iterator[Entry]:
        return walk(self.path, self.follow_symlinks, self.exclude, notes)


class ListSource(Source):
    """A text file of paths, one per line: absolute, or relative to the list file's folder.

    The manifest's path is the line as written; a path that is missing, a folder or listed
    again is a row with its reason (blank lines are skipped).
    """

    kind = "list"

    def __init__(self, path: Path):
        self.name = str(Path(path).resolve())

    def entries(self, notes: WalkNotes) -> Iterator[Entry]:
        base = os.path.dirname(self.name)
        seen: dict[str, int] = {}
        with open(self.name, encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                listed = line.rstrip("\r\n")
                if not listed.strip():
                    continue
                rel, where = printable(listed), os.path.join(base, listed)
                if rel in seen:
                    yield Entry(where, rel, "unsupported", f"listed again on line {number} (first on line "
                                                           f"{seen[rel]}): packed once")
                    continue
                seen[rel] = number
                try:
                    st = os.stat(where)
                except FileNotFoundError:
                    yield Entry(where, rel, "read_error", f"listed on line {number} but not found")
                    continue
                except OSError as exc:
                    yield Entry(where, rel, "read_error", f"cannot stat: {exc.strerror}")
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield Entry(where, rel, size=st.st_size, mtime_ns=st.st_mtime_ns)
                else:
                    yield Entry(where, rel, "unsupported", "a folder: list files, not folders" if
                                stat.S_ISDIR(st.st_mode) else "not a regular file")


class _MemberFile(io.RawIOBase):
    """One tar member's bytes read from the archive at its data offset; a member cut short by
    the end of the archive (or a damaged compressed stream) raises OSError."""

    def __init__(self, f, offset: int, size: int, owns: bool):
        self.f, self.offset, self.size, self.owns, self.pos = f, offset, size, owns, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        try:
            self.f.seek(self.offset + self.pos)
            data = self.f.read(n)
        except (EOFError, tarfile.TarError, ValueError) as exc:  # gzip: a damaged or cut stream
            raise OSError(f"damaged archive: {exc}") from None
        if len(data) < n:
            raise OSError(f"the archive ends inside this member ({self.pos + len(data)} of {self.size} bytes)")
        self.pos += n
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.owns and not self.closed:
            self.f.close()
        super().close()


class TarSource(Source):
    """A tar archive (.tar, .tar.gz, .tgz); the manifest's path is the member's name.

    Members are never extracted: a name that would escape (absolute, or with ../), a link or
    device, a member the archive ends inside of, and every earlier member of a name given
    again (the last one is packed, as `tar -x` keeps it) are rows with their reason. An
    uncompressed archive is read at each member's data offset, many at once; a compressed one
    in order, by one thread (a gzip stream can't be read at an offset cheaply).
    """

    kind = "tar"

    def __init__(self, path: Path):
        self.name = str(Path(path).resolve())
        self.compressed = self.name.endswith(_COMPRESSED_TAR)
        try:
            self.tar = tarfile.open(self.name, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise PackUsageError(f"{path} is not a tar archive bulkdet can read: {exc}") from None
        self.threads = 1 if self.compressed else None

    def entries(self, notes: WalkNotes) -> Iterator[Entry]:
        members, damage = [], None
        try:
            for m in self.tar:
                members.append(m)
        except (tarfile.TarError, EOFError, OSError) as exc:  # a cut or damaged archive: what came before counts
            damage = f"the archive is damaged after {len(members)} members: {exc}"
        last = {m.name: i for i, m in enumerate(members)}
        archive_size = None if self.compressed else os.path.getsize(self.name)
        for i, m in enumerate(members):
            if m.isdir():
                continue
            rel = printable(m.name)
            parts = posixpath.normpath(m.name).split("/")
            if m.name.startswith("/") or ".." in parts:
                yield Entry(m.name, rel, "unsupported", "the member's name escapes the archive (absolute, or "
                                                          "with ../): not packed")
            elif last[m.name] != i:
                yield Entry(m.name, rel, "unsupported", f"member {i} of the archive, named again by member "
                                                          f"{last[m.name]}: the last one is packed (as tar -x keeps it)")
            elif not m.isreg():
                what = "link" if m.issym() or m.islnk() else "device, FIFO or other special file"
                yield Entry(m.name, rel, "unsupported", f"the member is a {what}, not a regular file")
            elif archive_size is not None and m.offset_data + m.size > archive_size:
                yield Entry(m.name, rel, "read_error", f"the archive ends inside this member ({m.size} bytes "
                                                       f"from byte {m.offset_data}, the archive has {archive_size})")
            else:
                yield Entry(m.name, rel, size=m.size, mtime_ns=int(m.mtime) * 10**9, offset=m.offset_data)
        if damage:
            yield Entry(self.name, f"{os.path.basename(self.name)}:damaged", "read_error", damage)

    def open(self, entry: Entry) -> BinaryIO:
        if self.compressed:  # the shared stream, read forward in member order (threads = 1), the member
            # whole at once: seeking back in a gzip stream (to read past the header) restarts it
            with _MemberFile(self.tar.fileobj, entry.offset, entry.size, owns=False) as member:
                return io.BytesIO(member.read())
        return io.BufferedReader(_MemberFile(open(self.name, "rb"), entry.offset, entry.size, owns=True))

    def close(self) -> None:
        self.tar.close()


def _mtime_ns(info: dict) -> int | None:
    """An object's modification time from an fsspec listing (each backend names it its own way)."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        v = info.get(k)
        if isinstance(v, datetime):
            return int(v.timestamp() * 1e9)
        if isinstance(v, (int, float)):
            return int(v * 1e9)
        if isinstance(v, str):
            try:
                return int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                pass
    return None


class UrlSource(Source):
    """Objects under an fsspec URL (s3://bucket/prefix, gs://, az://), many read at once."""

    kind = "url"
    unit = "object"
    threads = 32  # object stores: latency-bound, so many requests in flight (bytes bounded by pack)

    def __init__(self, url: str, storage_options: dict | None):
        self.name, self.options = url, storage_options or {}
        self.fs, self.root = filesystem(url, self.options)
        self.root = self.root.rstrip("/")

    def entries(self, notes: WalkNotes) -> Iterator[Entry]:
        try:
            found = self.fs.find(self.root, detail=True)
        except Exception as exc:  # the backend's own errors: credentials, endpoint, no bucket
            raise RuntimeError(f"cannot list {self.name}: {type(exc).__name__}: {exc}") from None
        if not found:
            raise PackUsageError(f"nothing found at {self.name}: check the URL (and --storage-options)")
        for path in sorted(found):
            info = found[path]
            if info.get("type") == "directory":
                continue
            rel = path[len(self.root):].lstrip("/") if path.startswith(self.root + "/") else posixpath.basename(path)
            yield Entry(path, rel, size=info.get("size"), mtime_ns=_mtime_ns(info))

    def open(self, entry: Entry) -> BinaryIO:
        return self.fs.open(entry.abspath, "rb")

    def description(self) -> dict:
        return {**super().description(), "storage_options": public_options(self.options)}


def open_source(src, storage_options: dict | None = None, follow_symlinks: bool = False,
                exclude: Path | None = None) -> Source:
    """The source SRC names: a URL, a folder, a tar archive, or else a text file listing paths."""
    if is_url(str(src)):
        return UrlSource(str(src), storage_options)
    if storage_options:
        raise PackUsageError("--storage-options is for URLs (s3://, gs://, az://), not local paths")
    path = Path(src)
    if path.is_dir():
        return DirectorySource(path, follow_symlinks, exclude)
    if not path.is_file():
        raise PackUsageError(f"{src} is neither a folder, a file nor a URL")
    if str(path).endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path):
        return TarSource(path)
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise PackUsageError(f"{src} is a file but neither a tar archive nor a text list of paths")
    return ListSource(path)
