"""Batches from the manifest: which images go together, at which input shape.

Images are grouped, within each shard, into aspect-ratio buckets. Every image is resized
exactly as square letterboxing would resize it (long side = imgsz), but it is padded only
up to the next multiple of the model stride on its short side ("rectangular inference"),
so a 16:9 image is computed at 640x384 instead of 640x640. Batches are cut so that their
input pixels stay under the pixel budget (what the engine computes and holds), their
original pixels under the decode budget (what the decoder holds decoded), and their size
under max_batch. A batch never spans two shards: the shard is the unit of output parts,
of resume and of scale-out. The plan is deterministic: the same manifest and settings give
the same batches.

Per-image numbers are numpy arrays; a Batch (with its Python lists of paths and keys) is
made only when the runner asks for it, so planning ten million images holds ~40 bytes an
image, not a Python object per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from bulkdet.model.info import DEFAULT_STRIDE, model_input_hw

# CPU: batch size barely changes throughput, while the engine's memory grows with the
# pixels of a batch (0.1-0.2 GB per million input pixels for YOLOv8n): two 640x640
# inputs, three 640x384 ones, or --max-batch small ones.
CPU_PIXEL_BUDGET = 2 * 640 * 640
DEFAULT_DECODE_BUDGET = 64_000_000  # original pixels decoded at once: 192 MB of RGB


@dataclass(frozen=True)
class Letterbox:
    """Per-image geometry of a batch: resize to (new_h, new_w), paste at (top, left)."""

    new_w: np.ndarray  # int32 [B]
    new_h: np.ndarray
    left: np.ndarray
    top: np.ndarray

    def scale(self, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input pixels per original pixel, per axis (exact, after rounding the resize)."""
        return self.new_w / width, self.new_h / height


def fit_size(width, height, input_h: int, input_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(new_w, new_h): keep aspect, fit inside (input_h, input_w)."""
    width = np.asarray(width, np.float64)
    height = np.asarray(height, np.float64)
    r = np.minimum(input_h / height, input_w / width)
    new_w = np.clip(np.round(width * r), 1, input_w).astype(np.int32)
    new_h = np.clip(np.round(height * r), 1, input_h).astype(np.int32)
    return new_w, new_h


def centred(new_w: np.ndarray, new_h: np.ndarray, input_h: int, input_w: int) -> Letterbox:
    """Paste the resized images in the middle of (input_h, input_w), gray around."""
    return Letterbox(new_w, new_h, (input_w - new_w) // 2, (input_h - new_h) // 2)


def letterbox(width: np.ndarray, height: np.ndarray, input_h: int, input_w: int) -> Letterbox:
    """Keep aspect, fit inside (input_h, input_w), centre on gray padding."""
    return centred(*fit_size(width, height, input_h, input_w), input_h, input_w)


def round_up(x, m: int):
    return -(-x // m) * m


def bucket_shapes(new_w: np.ndarray, new_h: np.ndarray, side: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_h, input_w) of each image's bucket: its resized size rounded up to the stride."""
    return (np.minimum(round_up(new_h, stride), side).astype(np.int32),
            np.minimum(round_up(new_w, stride), side).astype(np.int32))


def input_shapes(imgsz: int, stride: int = DEFAULT_STRIDE, fixed_hw: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Every (input_h, input_w) a plan can use: the buckets (long side imgsz rounded up to the
    stride, short side any multiple of the stride), or the fixed shape. For engines that size
    buffers or optimisation profiles ahead of the data."""
    if fixed_hw:
        return [model_input_hw(imgsz, stride, fixed_hw)]
    side, _ = model_input_hw(imgsz, stride)
    short = range(stride, side + 1, stride)
    return sorted({(side, s) for s in short} | {(s, side) for s in short})


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


@dataclass(frozen=True)
class Batch:
    batch_id: int
    shard: int
    image_ids: np.ndarray  # int64 [B]
    paths: list[str]
    keys: list[bytes]
    width: np.ndarray  # upright original size, int32 [B]
    height: np.ndarray
    input_hw: tuple[int, int]
    letterbox: Letterbox
    pack_status: list[str] | None = None  # the manifest's status (ok, corrupt): kept when the image decodes
    pack_error: list[str | None] | None = None
    tiles: TileInfo | None = None  # items of tiled images (run/tiles.py): width/height are their windows'

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class BatchPlan:
    """Batches in run order, made on demand; `stats` says what the buckets saved.

    Rows of `table` are in run order: batch i is rows starts[i]:starts[i+1].
    """

    table: pa.Table  # the manifest rows planned (path and key are read from it per batch)
    image_id: np.ndarray  # int64, per row
    shard: np.ndarray
    width: np.ndarray  # int32 upright original size, per row
    height: np.ndarray
    new_w: np.ndarray  # int32 resized size, per row
    new_h: np.ndarray
    starts: np.ndarray  # first row of each batch, plus the end
    input_hw: np.ndarray  # int32 [n_batches, 2]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_hw)

    def __iter__(self):
        return (self.batch(i) for i in range(len(self)))

    def batch(self, i: int) -> Batch:
        start, end = int(self.starts[i]), int(self.starts[i + 1])
        rows = self.table.slice(start, end - start)
        h, w = (int(v) for v in self.input_hw[i])
        return Batch(
            batch_id=i, shard=int(self.shard[start]), image_ids=self.image_id[start:end],
            paths=rows.column("path").to_pylist(), keys=rows.column("key").to_pylist(),
            width=self.width[start:end], height=self.height[start:end], input_hw=(h, w),
            letterbox=centred(self.new_w[start:end], self.new_h[start:end], h, w),
            pack_status=_optional(rows, "status"), pack_error=_optional(rows, "error"), tiles=TileInfo.of(rows))

    def batch_sizes(self) -> np.ndarray:
        return np.diff(self.starts)


def _optional(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def default_pixel_budget(device: str, side: int, max_batch: int) -> int:
    """Input pixels a batch may hold: full batches of square inputs on GPU; on CPU,
    CPU_PIXEL_BUDGET (but at least one square input)."""
    if device == "gpu":
        return max_batch * side * side
    return max(CPU_PIXEL_BUDGET, side * side)


def plan(images: pa.Table, imgsz: int = 640, max_batch: int = 32, *, stride: int = DEFAULT_STRIDE,
         pixel_budget: int | None = None, decode_budget: int | None = None,
         fixed_hw: tuple[int, int] | None = None) -> BatchPlan:
    """Bucket and batch `images` (manifest rows with image_id, shard, width, height, path, key).

    `fixed_hw`: the model's input shape is fixed, so every image is letterboxed to it (one
    bucket). Otherwise the long side is imgsz rounded up to the stride, and each image's
    bucket is its resized size rounded up to the stride. Budgets of None mean unbounded;
    a single image over a budget still gets a batch of its own.
    """
    shard = _column(images, "shard").astype(np.int64)
    width = _column(images, "width").astype(np.int32)
    height = _column(images, "height").astype(np.int32)
    square_hw = model_input_hw(imgsz, stride, fixed_hw)
    new_w, new_h = fit_size(width, height, *square_hw)  # buckets resize exactly as square does
    if fixed_hw:
        in_h, in_w = np.full(len(images), square_hw[0], np.int32), np.full(len(images), square_hw[1], np.int32)
    else:
        in_h, in_w = bucket_shapes(new_w, new_h, square_hw[0], stride)

    # Run order: shard, then bucket, then image_id (so a batch never spans two shards); tile
    # items' batches are then merged across buckets by their first image (_by_first_image).
    order = np.lexsort((_column(images, "image_id"), in_w, in_h, shard))
    table = images.take(pa.array(order, pa.int64())).combine_chunks()
    shard, width, height = shard[order], width[order], height[order]
    new_w, new_h, in_h, in_w = new_w[order], new_h[order], in_h[order], in_w[order]
    original = width.astype(np.int64) * height
    tiled = "tile_x" in table.column_names
    starts, cut_by = _cut(shard, in_h, in_w, original, max_batch, pixel_budget, decode_budget,
                          _item_windows(table) if tiled else None)
    if tiled:  # the same batches, reordered so that images complete steadily
        rows, starts = _by_first_image(starts, shard, _column(table, "image_id"))
        table = table.take(pa.array(rows, pa.int64()))
        shard, width, height, original = shard[rows], width[rows], height[rows], original[rows]
        new_w, new_h, in_h, in_w = new_w[rows], new_h[rows], in_h[rows], in_w[rows]

    result = BatchPlan(table, _column(table, "image_id").astype(np.int64), shard, width, height, new_w, new_h,
                  starts, np.stack([in_h[starts[:-1]], in_w[starts[:-1]]], 1).astype(np.int32))
    square_image_pixels = int((new_w.astype(np.int64) * new_h).sum())
    result.stats = {
        **_stats(result, square_hw, square_image_pixels, original),
        "rectangular": not fixed_hw, "max_batch": max_batch, "pixel_budget": pixel_budget,
        "decode_budget": decode_budget, "batches_cut_by": cut_by,
    }
    return result


def _by_first_image(starts: np.ndarray, shard: np.ndarray, image_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tile items: (rows in the new run order, new batch starts) when each batch of a shard runs
    as the first image it holds comes up, instead of bucket after bucket.

    An image's items lie in several buckets (its tiles in SIZE x SIZE, its full pass in an
    aspect bucket): bucket after bucket, every image of a shard would wait for its tiles until
    all full passes had run, holding its boxes and committing nothing. Merged by first image,
    the buckets advance together: the images pending at any time are at most those of one batch
    a bucket, and the first images complete after a few batches. Batches stay as cut (full,
    within the budgets); ties keep the bucket order (deterministic, so a resume plans alike)."""
    first = starts[:-1]
    sizes = np.diff(starts)
    order = np.lexsort((np.arange(len(first)), image_id[first], shard[first]))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    rows = np.argsort(rank[np.repeat(np.arange(len(first)), sizes)], kind="stable")
    return rows, np.r_[0, np.cumsum(sizes[order])].astype(np.int64)


def _item_windows(table: pa.Table) -> tuple[list, np.ndarray]:
    """(image id, window x0, y0, x1, y1) per row of tile items (run/tiles.py)."""
    x, y = _column(table, "tile_x").astype(np.int64), _column(table, "tile_y").astype(np.int64)
    win = np.stack([x, y, x + _column(table, "width"), y + _column(table, "height")], 1)
    return _column(table, "image_id").tolist(), win


def _cut(shard, in_h, in_w, original, max_batch: int, pixel_budget: int | None,
         decode_budget: int | None, items: tuple[list, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """Greedy batches over rows in run order: a new batch at each new (shard, bucket), and
    when the next image would break max_batch, the pixel budget or the decode budget.

    `items` (tile items): the decoder decodes, per image of a batch, the window bounding that
    image's items in the batch; the decode budget counts those windows' pixels."""
    pixel_budget = pixel_budget or np.iinfo(np.int64).max
    decode_budget = decode_budget or np.iinfo(np.int64).max
    n = len(shard)
    group = np.ones(n, bool)  # True where a new (shard, bucket) begins
    group[1:] = (shard[1:] != shard[:-1]) | (in_h[1:] != in_h[:-1]) | (in_w[1:] != in_w[:-1])
    starts = []
    cut_by = {"max_batch": 0, "pixel_budget": 0, "decode_budget": 0}
    count = decoded = 0
    pixels = (in_h.astype(np.int64) * in_w).tolist()
    region = region_area = None  # the decoded window of the last row's image in this batch
    for pos, (new_group, px, orig) in enumerate(zip(group.tolist(), pixels, original.tolist())):
        grown = None
        if items is not None:
            win = items[1][pos]
            if count and not new_group and items[0][pos] == items[0][pos - 1]:
                grown = np.r_[np.minimum(region[:2], win[:2]), np.maximum(region[2:], win[2:])]
                orig = int((grown[2] - grown[0]) * (grown[3] - grown[1])) - region_area
        if count and not new_group:
            reason = ("max_batch" if count + 1 > max_batch else
                      "pixel_budget" if (count + 1) * px > pixel_budget else
                      "decode_budget" if decoded + orig > decode_budget else None)
            if reason:
                cut_by[reason] += 1
                count = 0
        if new_group or not count:
            starts.append(pos)
            count = decoded = 0
            grown = None
        if items is not None:
            if grown is None:  # a new image in this batch
                grown = items[1][pos]
                orig = int((grown[2] - grown[0]) * (grown[3] - grown[1]))
                region_area = 0
            region = grown
            region_area += orig
        count += 1
        decoded += orig
    starts.append(n)
    return np.asarray(starts, np.int64), cut_by


def _stats(p: BatchPlan, square_hw: tuple[int, int], square_image_pixels: int, original: np.ndarray) -> dict:
    """Padding waste (padded / computed pixels) of this plan and of square letterboxing."""
    n = len(p.image_id)
    sizes = p.batch_sizes()
    batch_pixels = sizes * p.input_hw[:, 0].astype(np.int64) * p.input_hw[:, 1]
    computed = int(batch_pixels.sum())
    square_computed = n * square_hw[0] * square_hw[1]
    buckets: dict[str, int] = {}
    for (h, w), size in zip(p.input_hw.tolist(), sizes.tolist()):
        buckets[f"{h}x{w}"] = buckets.get(f"{h}x{w}", 0) + size
    decoded = np.add.reduceat(original, p.starts[:-1]) if len(p) else np.zeros(1, np.int64)
    return {
        "images": n, "batches": len(p), "shards": int(len(np.unique(p.shard))),
        "square_hw": list(square_hw),
        "mean_batch": round(float(sizes.mean()), 3) if len(p) else 0.0,
        "largest_batch_input_pixels": int(batch_pixels.max()) if len(p) else 0,
        "largest_batch_original_pixels": int(decoded.max()),
        "images_per_bucket": dict(sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0]))),
        "computed_pixels": computed,
        "padding_waste": _ratio(computed - square_image_pixels, computed),
        "square_computed_pixels": square_computed,
        "square_padding_waste": _ratio(square_computed - square_image_pixels, square_computed),
        "computed_vs_square": _ratio(computed, square_computed),
    }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 6) if b else 0.0


def plan_batches(images: pa.Table, input_hw: tuple[int, int], max_batch: int) -> list[Batch]:
    """Fixed-size batches at one input shape, in shard order (reads stay local)."""
    return list(plan(images, max(input_hw), max_batch, fixed_hw=tuple(input_hw)))
