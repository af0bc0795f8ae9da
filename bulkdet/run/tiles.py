"""Sliced inference (`--tile`): tiles planned from the manifest, their boxes merged per image.

A large image is cut into tiles of `size` original pixels overlapping by `overlap`; the tiles at
the right and bottom edges are shifted inside the image (never padded), and an image no larger
than a tile is not tiled. Each tile is a batch item like an image (run/plan.py buckets and batches
items of many images together); `full` adds the whole image, letterboxed as without tiles, as one
more item. Detections of an image's items are mapped back to original pixels and merged
(`merge`): greedy non-max merging (SAHI's GREEDYNMM: boxes that match by IoS or IoU become their
union, with the best score) or NMS. `ImageAssembler` holds an image's items until all are in,
so the writer only ever sees complete images: a resumed run never finds half an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bulkdet.choices import TileMatch, TileMerge
from bulkdet.store.manifest import PROCESSED_STATUSES


@dataclass(frozen=True)
class TileSettings:
    size: int = 0  # tile side in original pixels; 0 = no tiling
    overlap: float = 0.2  # share of the tile shared with its neighbour
    full: bool = True  # also the whole image, letterboxed (SAHI's "standard prediction")
    merge: str = TileMerge.NMM.value
    match: str = TileMatch.IOS.value
    match_threshold: float = 0.5

    @property
    def on(self) -> bool:
        return self.size > 0

    def identity(self) -> dict | None:
        """What the results depend on (part of the run folder's identity); None without tiles."""
        return {"size": self.size, "overlap": self.overlap, "full": self.full, "merge": str(self.merge),
                "match": str(self.match), "match_threshold": self.match_threshold} if self.on else None


def starts(length: int, size: int, overlap: float) -> list[int]:
    """Tile origins along one axis: a step of size * (1 - overlap), the last tile shifted inside."""
    if length <= size:
        return [0]
    step = max(1, size - int(round(size * overlap)))
    last = length - size
    return list(range(0, last, step)) + [last]


def windows(width: int, height: int, size: int, overlap: float) -> np.ndarray:
    """Tiles of one image, row-major, as int32 [n, 4] x0, y0, x1, y1 (original pixels)."""
    xs, ys = starts(width, size, overlap), starts(height, size, overlap)
    return np.array([(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs], np.int32)


def expand(rows: pa.Table, settings: TileSettings) -> pa.Table:
    """Manifest rows -> item rows: a tiled image becomes its tiles (plus the full image with `full`).

    Item rows keep the image's columns, with width/height the item's window size, and add the
    window's origin (tile_x, tile_y), the image's size (image_width, image_height), whether the
    item is a tile of a tiled image (`tile`) and how many items the image has (`items`).
    Items of one image follow each other in row-major order (the planner keeps that order).
    """
    width = rows.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
    height = rows.column("height").to_numpy(zero_copy_only=False).astype(np.int64)
    cache: dict[tuple[int, int], np.ndarray] = {}
    take, wins, is_tile, items = [], [], [], []
    for i, (w, h) in enumerate(zip(width.tolist(), height.tolist())):
        key = (w, h)
        if key not in cache:
            cache[key] = _items_of(w, h, settings)
        win, tiles = cache[key]
        take.append(np.full(len(win), i, np.int64))
        wins.append(win)
        is_tile.append(tiles)
        items.append(np.full(len(win), len(win), np.int32))
    if not take:
        empty = np.zeros(0, np.int32)
        return _add_columns(rows.slice(0, 0), np.zeros((0, 4), np.int32), np.zeros(0, bool), empty, empty, empty)
    take_idx = np.concatenate(take)
    out = rows.take(pa.array(take_idx))
    return _add_columns(out, np.concatenate(wins), np.concatenate(is_tile), np.concatenate(items),
                        width[take_idx], height[take_idx])


def _items_of(width: int, height: int, settings: TileSettings) -> tuple[np.ndarray, np.ndarray]:
    """(windows, is-tile flags) of one image size."""
    whole = np.array([[0, 0, width, height]], np.int32)
    if width <= settings.size and height <= settings.size:
        return whole, np.zeros(1, bool)
    tiles = windows(width, height, settings.size, settings.overlap)
    if settings.full:
        return np.concatenate([tiles, whole]), np.r_[np.ones(len(tiles), bool), False]
    return tiles, np.ones(len(tiles), bool)


def _add_columns(table: pa.Table, win, is_tile, items, image_w, image_h) -> pa.Table:
    table = table.drop_columns([c for c in ("width", "height") if c in table.column_names])
    return (table.append_column("width", pa.array(win[:, 2] - win[:, 0], pa.int32()))
            .append_column("height", pa.array(win[:, 3] - win[:, 1], pa.int32()))
            .append_column("tile_x", pa.array(win[:, 0], pa.int32()))
            .append_column("tile_y", pa.array(win[:, 1], pa.int32()))
            .append_column("image_width", pa.array(image_w, pa.int32()))
            .append_column("image_height", pa.array(image_h, pa.int32()))
            .append_column("tile", pa.array(is_tile, pa.bool_()))
            .append_column("items", pa.array(items, pa.int32())))


@dataclass(frozen=True)
class TileInfo:
    """The items of a batch (arrays [B]): window origin, the whole image's size, tile or not,
    items of the image. A Batch of items has width/height = the window's size."""

    x: np.ndarray
    y: np.ndarray
    image_width: np.ndarray
    image_height: np.ndarray
    tile: np.ndarray
    items: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> "TileInfo | None":
        if "tile_x" not in table.column_names:
            return None
        col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
        return cls(col("tile_x"), col("tile_y"), col("image_width"), col("image_height"), col("tile"), col("items"))

    def regions(self, image_ids: np.ndarray, width: np.ndarray,
                height: np.ndarray) -> list[tuple[int, list[int], tuple]]:
        """Per image of the batch: (first item, its items, the bounding window x0, y0, x1, y1 of
        those items). The decoder decodes that window once and cuts the items from it."""
        groups: dict[int, list[int]] = {}
        for i, image_id in enumerate(image_ids.tolist()):
            groups.setdefault(image_id, []).append(i)
        out = []
        for idx in groups.values():
            x0, y0 = int(self.x[idx].min()), int(self.y[idx].min())
            x1 = int((self.x[idx] + width[idx]).max())
            y1 = int((self.y[idx] + height[idx]).max())
            out.append((idx[0], idx, (x0, y0, x1, y1)))
        return out


# ------------------------------------------------------------------------------------ merging

def overlap_matrix(a: np.ndarray, b: np.ndarray, match: str) -> np.ndarray:
    """[len(a), len(b)] intersection over union (iou) or over the smaller area (ios)."""
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    if match == TileMatch.IOU:
        denom = area_a[:, None] + area_b[None, :] - inter
    else:
        denom = np.minimum(area_a[:, None], area_b[None, :])
    return inter / np.maximum(denom, 1e-9)


def merge(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, from_tile: np.ndarray,
          settings: TileSettings, max_det: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image's boxes (original pixels) from all its items, merged class by class.

    Boxes are taken by score, then by area (a whole box before the fragments a seam cut off
    at equal score). `nmm`: a box absorbs every box of its class that matches its growing
    union, until none does; the result is that union (of the tile boxes only, when tile boxes
    are in the group: the full pass's coarse boxes never grow them) with the best score.
    `nms`: the matching boxes are dropped instead.
    """
    n = len(scores)
    if n == 0:
        return boxes, scores, class_ids
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.lexsort((-area, -scores))
    boxes, scores, class_ids, from_tile = boxes[order], scores[order], class_ids[order], from_tile[order]
    alive = np.ones(n, bool)
    out_b, out_s, out_c = [], [], []
    for i in range(n):
        if not alive[i]:
            continue
        alive[i] = False
        same = alive & (class_ids == class_ids[i])
        group = [i]
        union = boxes[i].copy()
        while True:
            cand = np.flatnonzero(same)
            if not cand.size:
                break
            hit = cand[overlap_matrix(union[None], boxes[cand], settings.match)[0] > settings.match_threshold]
            if not hit.size:
                break
            same[hit] = alive[hit] = False
            group.extend(hit.tolist())
            if settings.merge == TileMerge.NMS:
                continue  # NMS: matches against the kept box only, which never grows
            union = _union(boxes[group], from_tile[group])
        out_b.append(union if settings.merge == TileMerge.NMM else boxes[i])
        out_s.append(scores[group].max())
        out_c.append(class_ids[i])
    keep = np.argsort(-np.asarray(out_s), kind="stable")[:max_det]
    return (np.asarray(out_b, np.float32)[keep], np.asarray(out_s, np.float32)[keep],
            np.asarray(out_c, class_ids.dtype)[keep])


def _union(boxes: np.ndarray, from_tile: np.ndarray) -> np.ndarray:
    """The union of a group's tile boxes (full-pass boxes count only when no tile box is in it)."""
    if from_tile.any():
        boxes = boxes[from_tile]
    return np.r_[boxes[:, :2].min(0), boxes[:, 2:].max(0)]


# --------------------------------------------------------------------------- assembling images

@dataclass
class _Pending:
    path: str
    width: int
    height: int
    items: int
    seen: int = 0
    status: str = "ok"
    error: str | None = None
    parts: list | None = None  # (boxes, scores, class_ids, from_tile) per item that has detections


class ImageAssembler:
    """Gathers the items of each image across batches; hands out only complete images, merged.

    The items of an image may span batches (and several images' items share one); an image
    is released when its last item arrives, so parts hold complete images only. What is
    still pending when a run stops is lost with the process and redone on resume.
    """

    def __init__(self, settings: TileSettings, max_det: int):
        self.settings = settings
        self.max_det = max_det
        self.pending: dict[int, _Pending] = {}

    def add(self, batch, status: list[str], error: list[str | None], detections: list):
        """The items of `batch` (per item status, error, Detections or None); returns the columns
        (image_ids, paths, width, height, status, error, detections) of the images completed."""
        from bulkdet.run.postprocess import Detections

        t = batch.tiles
        done = []
        for i, image_id in enumerate(batch.image_ids.tolist()):
            p = self.pending.get(image_id)
            if p is None:
                p = self.pending[image_id] = _Pending(batch.paths[i], int(t.image_width[i]), int(t.image_height[i]),
                                                      int(t.items[i]), parts=[])
            p.seen += 1
            if _rank(status[i]) > _rank(p.status):  # an item that failed fails its image; then `corrupt`
                p.status, p.error = status[i], error[i]
            elif p.error is None and error[i]:
                p.error = error[i]
            d = detections[i]
            if d is not None and len(d):
                shift = np.array([t.x[i], t.y[i], t.x[i], t.y[i]], np.float32)
                p.parts.append((d.boxes + shift, d.scores, d.class_ids, np.full(len(d), bool(t.tile[i]))))
            if p.seen == p.items:
                del self.pending[image_id]
                dets = None
                if p.status in PROCESSED_STATUSES:
                    if p.parts:
                        b, s, c = merge(*(np.concatenate(x) for x in zip(*p.parts)), self.settings, self.max_det)
                        dets = Detections(b, s, c)
                    else:
                        dets = Detections.refused(None)
                done.append((image_id, p.path, p.width, p.height, p.status, p.error, dets))
        return [list(col) for col in zip(*done)] if done else None


def _rank(status: str) -> int:
    """ok < corrupt (decoded, with its detections) < any failure."""
    return 0 if status == "ok" else 1 if status in PROCESSED_STATUSES else 2
