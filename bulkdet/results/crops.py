"""`bulkdet crops`: each detection cut out of its image as a JPEG, a folder per class.

The pixels come from the dataset's shards (the bytes the run read), decoded upright by the run's
decoder (DALI, EXIF orientation applied: run boxes are in upright pixels), cut there in batches
(run/decode.py `CropDecoder`; on the GPU the cut happens on the GPU and only the crops come
back). What DALI rejects falls back to Pillow, per image, as in the run. DALI has no JPEG
encoder on the CPU: Pillow encodes the cut pixels, in parallel threads (it releases the GIL).

DIR/crops.json records the settings; a re-run with the same settings skips the crops already
there (names are deterministic), other settings are refused unless --overwrite. A crop appears
only complete (temporary name, rename); DIR/crops.parquet indexes them at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bulkdet.results.export import OutputExists
from bulkdet.results.run_info import RunInfo, UsageError
from bulkdet.store.parts import PartResults, RESULT_STATUSES, count_images, iter_parts
from bulkdet.run.progress import Progress
from bulkdet.store.atomic import open_atomic, write_json_atomic
from bulkdet.store.manifest import read_manifest
from bulkdet.store.readers import ShardBytes, ReferenceBytes, Unreadable, open_dataset_reader
from bulkdet.run.decode import CropDecoder
from bulkdet.system.devices import decode_device

log = logging.getLogger("bulkdet")

SETTINGS_FILE, INDEX_FILE = "crops.json", "crops.parquet"
JPEG_QUALITY = 95
DECODE_CHUNK = 16  # images read, decoded (a DALI batch), then their crops encoded in parallel, at once
CROPS_SCHEMA = pa.schema([
    ("crop_path", pa.string()),  # relative to DIR
    ("image_id", pa.int64()), ("path", pa.string()),
    ("class_id", pa.int16()), ("class_name", pa.string()), ("score", pa.float32()),
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),  # the detection
    ("crop_x1", pa.int32()), ("crop_y1", pa.int32()), ("crop_x2", pa.int32()), ("crop_y2", pa.int32()),  # cut
])


@dataclass(frozen=True)
class CropSettings:
    run_id: str | None
    conf: float | None
    class_ids: list[int] | None
    pad: float  # < 1: a fraction of the box's side on each side; >= 1: pixels
    min_size: int  # boxes with a shorter side are skipped
    square: bool
    quality: int = JPEG_QUALITY


@dataclass
class CropsSummary:
    out: Path
    crops: int = 0  # in crops.parquet
    written: int = 0
    skipped: int = 0  # already there from an earlier run with the same settings
    images_decoded: int = 0
    failed_images: int = 0


def crop_regions(boxes: np.ndarray, width: np.ndarray, height: np.ndarray, pad: float,
                 square: bool) -> np.ndarray:
    """Integer [x1, y1, x2, y2) pixel regions for float boxes [N, 4]: squared, padded, in the image.

    Box edges are pixel boundaries (x2 exclusive), rounded to the nearest one.
    """
    b = boxes.astype(np.float64)
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if square:
        side = np.maximum(bw, bh)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        b = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)
        bw = bh = side
    px, py = (np.full(len(b), pad), np.full(len(b), pad)) if pad >= 1 else (pad * bw, pad * bh)
    b = b + np.stack([-px, -py, px, py], 1)
    r = np.rint(b).astype(np.int64)
    r[:, 0] = np.clip(r[:, 0], 0, width - 1)
    r[:, 1] = np.clip(r[:, 1], 0, height - 1)
    r[:, 2] = np.clip(np.maximum(r[:, 2], r[:, 0] + 1), 1, width)
    r[:, 3] = np.clip(np.maximum(r[:, 3], r[:, 1] + 1), 1, height)
    return r


def class_folder(name: str, class_id: int) -> str:
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._")
    return safe or str(class_id)


def crop_name(image_path: str, k: int) -> str:
    """Deterministic: the image's path flattened ('/' -> '~'), then the detection's index in its image."""
    flat = "~".join(PurePosixPath(image_path).parts)
    return f"{flat}___crop{k:02d}.jpg"


def _check_out(out: Path, settings: CropSettings, overwrite: bool) -> bool:
    """Whether existing crops may be kept (same settings); refuses a folder bulkdet did not fill."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputExists(f"{out} exists and is a file; give a folder for --out")
    previous = out / SETTINGS_FILE
    if previous.exists():
        if json.loads(previous.read_text()) == asdict(settings):
            return not overwrite
        if not overwrite:
            raise OutputExists(f"{out} holds crops made with other settings ({previous}); "
                               "use --overwrite to replace them, or another --out")
        return False
    if any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} is not empty and holds no crops of bulkdet; use --overwrite to "
                           "write into it anyway, or another --out")
    return False


def crops(run_dir: Path, out: Path, conf: float | None = None, classes: list[str] | None = None,
          pad: float = 0.0, min_size: int = 0, square: bool = False, dataset: Path | None = None,
          overwrite: bool = False, quiet: bool = False, threads: int | None = None,
          device: str = "auto", storage_options: dict | None = None) -> CropsSummary:
    """`device`: where DALI decodes and cuts (auto: the GPU when DALI can decode there);
    `threads`: DALI's threads and the JPEG encoders' (default: the cores, at most 8);
    `storage_options`: fsspec options (credentials) for a dataset packed by reference from a URL,
    never written (crops.json keeps the settings of the crops only)."""
    info = RunInfo.load(run_dir)
    if pad < 0 or min_size < 0:
        raise UsageError("--pad and --min-size must be >= 0")
    device = decode_device(device)  # before anything is written: --device gpu without one fails here
    settings = CropSettings(info.run.get("run_id"), conf, info.class_ids(classes), pad, min_size, square)
    out = Path(out)
    keep_existing = _check_out(out, settings, overwrite)
    dataset = info.dataset(dataset)
    manifest = read_manifest(dataset).select(["image_id", "path", "shard", "key"])
    m_ids = manifest.column("image_id").to_numpy()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(asdict(settings), out / SETTINGS_FILE)
    summary = CropsSummary(out)
    threads = threads or min(8, os.cpu_count() or 1)
    decoder = CropDecoder(device, DECODE_CHUNK, threads)
    reader = open_dataset_reader(dataset, storage_options=storage_options)  # its shards, or the source (by reference)
    progress = Progress(count_images(run_dir), desc="crops", unit="img", quiet=quiet)
    try:
        with open_atomic(out / INDEX_FILE, "wb") as f, pq.ParquetWriter(f, CROPS_SCHEMA, compression="zstd") as index, \
                ThreadPoolExecutor(threads) as pool:
            for part in iter_parts(run_dir):
                rows = _part_crops(part, settings)
                if rows is not None:
                    index.write_table(rows)
                    summary.crops += len(rows)
                    _cut(rows, out, manifest, m_ids, reader, decoder, pool, settings, keep_existing, summary)
                progress.update(len(part.images))
    finally:
        progress.close()
        reader.close()
    return summary


def _part_crops(part: PartResults, s: CropSettings) -> pa.Table | None:
    """The crops of one part's detections, named and placed (CROPS_SCHEMA), or None."""
    d = part.detections
    if not len(d):
        return None
    row = np.repeat(np.arange(len(part.images)), np.diff(part.offsets))
    k = np.arange(len(d)) - part.offsets[row]  # index in its image, before any filter: stable names
    boxes = np.stack([d.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    score, class_id = d.column("score").to_numpy(), d.column("class_id").to_numpy()
    keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= s.min_size
    if s.conf is not None:
        keep &= score >= s.conf
    if s.class_ids is not None:
        keep &= np.isin(class_id, s.class_ids)
    status = np.asarray(part.images.column("status").to_pylist(), dtype=object)[row]
    keep &= np.isin(status, RESULT_STATUSES)
    if not keep.any():
        return None
    width = part.column("images", "width")[row][keep].astype(np.int64)
    height = part.column("images", "height")[row][keep].astype(np.int64)
    region = crop_regions(boxes[keep], width, height, s.pad, s.square)
    idx = pa.array(np.flatnonzero(keep))
    kept = d.take(idx)
    names = kept.column("class_name").to_pylist()
    paths = kept.column("path").to_pylist()
    crop_paths = [f"{class_folder(n, c)}/{crop_name(p, kk)}"
                  for n, c, p, kk in zip(names, class_id[keep].tolist(), paths, k[keep].tolist())]
    cols = {"crop_path": pa.array(crop_paths, pa.string()),
            **{c: kept.column(c) for c in ("image_id", "path", "class_id", "class_name", "score", "x1", "y1", "x2", "y2")},
            **{f"crop_{c}": pa.array(region[:, i], pa.int32()) for i, c in enumerate(("x1", "y1", "x2", "y2"))}}
    return pa.table(cols).cast(CROPS_SCHEMA)


def _cut(rows: pa.Table, out: Path, manifest: pa.Table, m_ids: np.ndarray, reader: ShardBytes | ReferenceBytes,
         decoder: CropDecoder, pool: ThreadPoolExecutor, s: CropSettings, keep_existing: bool,
         summary: CropsSummary) -> None:
    """Cut and write the crops of `rows` (those not already there)."""
    r = rows.to_pydict()
    by_image: dict[int, list[int]] = {}
    for i, image_id in enumerate(r["image_id"]):
        by_image.setdefault(image_id, []).append(i)
    todo = []
    for image_id, idx in by_image.items():
        need = [i for i in idx if not (keep_existing and (out / r["crop_path"][i]).exists())]
        summary.skipped += len(idx) - len(need)
        if need:
            todo.append((image_id, need))
    region = np.stack([np.asarray(r[f"crop_{c}"], np.int64) for c in ("x1", "y1", "x2", "y2")], 1)
    encoding: list = []  # the futures of the previous chunk's crops
    for start in range(0, len(todo), DECODE_CHUNK):
        chunk = todo[start:start + DECODE_CHUNK]
        at = np.searchsorted(m_ids, [image_id for image_id, _ in chunk])
        if np.any(at >= len(m_ids)) or not np.array_equal(m_ids[np.minimum(at, len(m_ids) - 1)], [c[0] for c in chunk]):
            raise RuntimeError("the dataset does not hold every image of the run: is it the dataset the run read? "
                               "(give it with --dataset)")
        m = manifest.take(pa.array(at)).to_pydict()
        blobs, images = [], []  # the bytes and the (image_id, crop rows) of the images that read
        for (image_id, need), shard, key, m_path in zip(chunk, m["shard"], m["key"], m["path"]):
            blob = reader.read(shard, [image_id], [key])[0]
            path = r["path"][need[0]]
            if isinstance(blob, Unreadable) or path != m_path:
                log.warning("crops: %s: %s", path, f"{blob.status}: {blob.error}" if isinstance(blob, Unreadable)
                            else f"the dataset has {m_path!r} under this id: not the run's dataset?")
                summary.failed_images += 1
            else:
                blobs.append(blob)
                images.append(need)
        pixels, errors = decoder.cut(blobs, [region[need] for need in images])
        for k, why in errors.items():
            log.warning("crops: %s: cannot decode: %s", r["path"][images[k][0]], why)
        summary.failed_images += len(errors)
        summary.images_decoded += len(images) - len(errors)
        jobs = [(out / r["crop_path"][i], crop) for k, need in enumerate(images) if k not in errors
                for i, crop in zip(need, pixels[k])]
        # Encoded while the next chunk decodes; one chunk waits at most (bounded memory).
        summary.written += sum(f.result() for f in encoding)
        encoding = [pool.submit(_save, path, crop, s.quality) for path, crop in jobs]
    summary.written += sum(f.result() for f in encoding)


def _save(path: Path, pixels: np.ndarray, quality: int) -> int:
    with open_atomic(path, "wb", fsync=False) as f:
        Image.fromarray(pixels).save(f, format="JPEG", quality=quality, subsampling=0)
    return 1
