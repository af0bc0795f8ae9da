"""The bytes of manifest rows, wherever the dataset keeps them: one interface, two homes.

A dataset packed by copy keeps every image's bytes in its LMDB shards (store/shards.py); one
packed by reference (`pack --reference`) keeps none and reads each image from its source at
run time: a local file, a member of an uncompressed tar at the data offset recorded at pack,
or an object by URL (fsspec). Bytes read by reference are checked against the sha256 taken at
pack: bytes that differ are never handed on (status `changed`), a source that is gone is a
`read_error`. `open_dataset_reader` picks the reader from the dataset's dataset.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulkdet.store.manifest import DATASET_FILE, read_manifest
from bulkdet.store.shards import ShardReader

# Extras that bring an fsspec backend, by URL scheme (pyproject.toml's optional dependencies).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
# storage_options keys never written to dataset.json: credentials come back from the environment.
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "connection", "session")


class MissingExtra(RuntimeError):
    """An fsspec backend is not installed; the message names the extra that brings it."""


def is_url(src: str) -> bool:
    return "://" in str(src) and str(src).split("://", 1)[0] not in ("", "file")


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec file system, path inside it) for `url`. Endpoint and credentials come from
    `storage_options` and, for what they leave out, the backend's usual environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*...)."""
    scheme = url.split("://", 1)[0]
    try:
        import fsspec

        return fsspec.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        extra = EXTRAS.get(scheme)
        what = f"pip install 'bulkdet[{extra}]'" if extra else "install the fsspec backend for it"
        raise MissingExtra(f"reading {scheme}:// needs a package that is not installed ({exc}): {what}") from None
    except ValueError as exc:  # an unknown protocol
        raise MissingExtra(f"cannot read {scheme}:// URLs: {exc}") from None


def public_options(options: dict | None) -> dict:
    """storage_options without credentials: what dataset.json may keep (e.g. an endpoint URL)."""
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items()
                if not any(w in k.lower() for w in _SECRET_WORDS) or k.lower().endswith("_url")}
    return clean(options or {})


@dataclass(frozen=True)
class Unreadable:
    """A row whose bytes can't be handed on: its images row gets this status and error."""

    status: str
    error: str


class ShardBytes:
    """A dataset packed by copy: the bytes from its LMDB shards."""

    def __init__(self, dataset_dir: Path):
        self.shards = ShardReader(Path(dataset_dir) / "shards")

    def read(self, shard: int, image_ids, keys: list[bytes]) -> list[bytes | Unreadable]:
        return [data if data is not None else Unreadable("decode_error", "bytes missing from shard")
                for data in self.shards.get_many(shard, keys)]

    def close(self) -> None:
        self.shards.close()


class ReferenceBytes:
    """A dataset packed by reference: each row's bytes read from its source, checked against its key.

    The rows of one call are read concurrently (`threads`), so object stores have many requests
    in flight; a call's bytes are bounded by the run's batches (the planner's decode budget).
    """

    def __init__(self, dataset_dir: Path, info: dict, threads: int | None = None,
                 storage_options: dict | None = None):
        m = read_manifest(dataset_dir).select(["image_id", "path", "bytes", "offset"])
        # Arrow columns, not Python lists: a 10M-row manifest stays a few hundred MB per process.
        self.ids = m.column("image_id").to_numpy()  # sorted: write_manifest sorts by image_id
        self.paths = m.column("path").combine_chunks()
        self.sizes = m.column("bytes").to_numpy(zero_copy_only=False)
        self.offsets = m.column("offset").combine_chunks()
        self.kind, self.root = info["source_kind"], info["source"]
        self.fs = None
        if self.kind == "url":
            # The run's own options (credentials: dataset.json keeps none) win over those kept at pack.
            options = {**(info.get("storage_options") or {}), **(storage_options or {})}
            self.fs, self.root = filesystem(info["source"], options)
        self.pool = ThreadPoolExecutor(threads or (32 if self.kind == "url" else 8))

    def _location(self, path: str) -> str:
        if self.kind == "list":  # as listed: absolute, or relative to the list file's folder
            return os.path.join(os.path.dirname(self.root), path)
        return self.root.rstrip("/") + "/" + path if self.kind == "url" else os.path.join(self.root, path)

    def _read_one(self, i: int) -> bytes:
        path, size = self.paths[i].as_py(), int(self.sizes[i])
        if self.kind == "tar":
            with open(self.root, "rb") as f:
                f.seek(self.offsets[i].as_py())
                return f.read(size)
        if self.kind == "url":
            return self.fs.cat_file(self._location(path))
        with open(self._location(path), "rb") as f:
            return f.read(size + 1)  # one byte more shows a file that grew

    def _checked(self, i: int, key: bytes) -> bytes | Unreadable:
        try:
            data = self._read_one(i)
        except FileNotFoundError:
            return Unreadable("read_error", "the source file is gone (packed by reference): "
                                            f"{self.root if self.kind == 'tar' else self._location(self.paths[i].as_py())}")
        except Exception as exc:  # OSError; for a URL also the backend's own errors (one image's, not the run's)
            if not isinstance(exc, OSError) and self.kind != "url":
                raise
            return Unreadable("read_error", f"cannot read the source (packed by reference): {exc}")
        if hashlib.sha256(data).digest() != key:
            return Unreadable("changed", f"the source changed since pack ({len(data)} bytes read, "
                                         f"{int(self.sizes[i])} packed, content differs): pack again to include it")
        return data

    def read(self, shard: int, image_ids, keys: list[bytes]) -> list[bytes | Unreadable]:
        at = np.searchsorted(self.ids, np.asarray(image_ids, np.int64))
        return list(self.pool.map(self._checked, at.tolist(), keys))

    def close(self) -> None:
        self.pool.shutdown()


def dataset_info(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / DATASET_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def reads_url(dataset_dir: Path) -> bool:
    """Whether this dataset's bytes are read from an object store (packed by reference from a URL)."""
    info = dataset_info(dataset_dir)
    return bool(info.get("reference")) and info.get("source_kind") == "url"


def open_dataset_reader(dataset_dir: Path, threads: int | None = None,
                        storage_options: dict | None = None) -> ShardBytes | ReferenceBytes:
    """The reader of this dataset's bytes: `.read(shard, image_ids, keys)` -> bytes or Unreadable per row.
    `storage_options`: fsspec options (e.g. credentials) for a dataset packed by reference from a URL."""
    info = dataset_info(dataset_dir)
    if info.get("reference"):
        return ReferenceBytes(dataset_dir, info, threads, storage_options)
    return ShardBytes(dataset_dir)
