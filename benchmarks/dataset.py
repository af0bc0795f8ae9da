"""Deterministic synthetic JPEG sets for benchmarks.

`make_jpeg_mix` writes photo-like JPEGs with a real-world size mix (mostly
landscape 640x480..1920x1080, a few 4000x3000, some portrait) so decode,
resize and batching costs look like a real crawl. `make_small_images` writes
many tiny JPEGs for the linear-scaling test. Both reuse a directory that was
already filled with the same parameters (a marker json records them).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bulkdet.store.atomic import write_json_atomic

# Bump when the generated content changes, so old caches are rebuilt.
GENERATOR_VERSION = 1
MARKER = "bulkdet-dataset.json"
QUALITY = 90

LANDSCAPE = [(640, 480), (800, 600), (1024, 768), (1280, 720),
             (1280, 960), (1600, 1200), (1920, 1080)]
PORTRAIT = [(1080, 1920), (768, 1024)]
HUGE = (4000, 3000)
HUGE_FRACTION = 0.03
PORTRAIT_FRACTION = 0.08


def size_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of each of the n images: exact mix counts, shuffled."""
    n_huge = round(n * HUGE_FRACTION)
    n_portrait = round(n * PORTRAIT_FRACTION)
    n_land = n - n_huge - n_portrait
    sizes = ([HUGE] * n_huge
             + [PORTRAIT[i % len(PORTRAIT)] for i in range(n_portrait)]
             + [LANDSCAPE[i % len(LANDSCAPE)] for i in range(n_land)])
    order = np.random.default_rng([seed, 1]).permutation(n)
    return [sizes[i] for i in order]


def photo_like(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 image that compresses roughly like a photo.

    Smooth colour gradients (sky, walls), a few hard-edged shapes (objects),
    mid-frequency texture (foliage, fabric) and mild sensor noise, each image
    with its own amount of texture. Pure noise would be far too large as JPEG
    and flat colour far too small. Integer maths and PIL resizes keep a
    12 MP image well under a second.
    """
    small = rng.integers(20, 236, (int(rng.integers(3, 6)), int(rng.integers(3, 6)), 3))
    canvas = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 20))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.02, 0.2) * w, rng.uniform(0.02, 0.2) * h
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=color)
        else:
            draw.rectangle(box, fill=color)

    # Texture: coarse noise blown up 4x, plus per-pixel noise from a tile
    # (tiling keeps this cheap; JPEG cannot exploit a 256 px period).
    tex_amp, grain_amp = rng.uniform(2, 8), rng.uniform(0.5, 2.0)
    coarse = rng.normal(128, tex_amp, (max(h // 4, 2), max(w // 4, 2)))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    noise = np.asarray(coarse).astype(np.int16) - 128
    tile = np.rint(rng.normal(0, grain_amp, (256, 256))).astype(np.int16)
    noise += np.tile(tile, (h // 256 + 1, w // 256 + 1))[:h, :w]
    img = np.asarray(canvas).astype(np.int16) + noise[..., None]
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _encode(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def _write_one(job: tuple[Path, int, int, int, int]) -> None:
    path, w, h, seed, i = job
    # Per-image seed: the bytes do not depend on which worker made them.
    arr = photo_like(w, h, np.random.default_rng([seed, 2, i]))
    path.write_bytes(_encode(arr))


def _cached(out_dir: Path, params: dict, names: list[str]) -> list[Path] | None:
    marker = out_dir / MARKER
    try:
        if json.loads(marker.read_text()) != params:
            return None
    except (OSError, ValueError):
        return None
    paths = [out_dir / name for name in names]
    return paths if all(p.is_file() for p in paths) else None


def _prepare(out_dir: Path, names: list[str]) -> None:
    """Create out_dir, drop its marker and JPEGs left over from another set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    keep = set(names)
    for p in out_dir.glob("*.jpg"):
        if p.name not in keep:
            p.unlink()


def _write_marker(out_dir: Path, params: dict) -> None:
    write_json_atomic(params, out_dir / MARKER)


def make_jpeg_mix(out_dir: str | Path, n: int, seed: int = 0, workers: int = 2) -> list[Path]:
    """Write n photo-like JPEGs with the real-world size mix; return their paths.

    Deterministic in (n, seed). Files are named NNNNNN.jpg in generation order.
    """
    out_dir = Path(out_dir)
    params = {"kind": "jpeg_mix", "version": GENERATOR_VERSION, "n": n, "seed": seed,
              "quality": QUALITY}
    names = [f"{i:06d}.jpg" for i in range(n)]
    if (paths := _cached(out_dir, params, names)) is not None:
        return paths

    _prepare(out_dir, names)
    jobs = [(out_dir / name, w, h, seed, i)
            for i, (name, (w, h)) in enumerate(zip(names, size_mix(n, seed)))]
    # Threads, not processes: PIL and numpy release the GIL for the heavy
    # parts (2 threads ~1.9x on 2 cores), and no spawn/fork pitfalls.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_write_one, jobs))
    _write_marker(out_dir, params)
    return [job[0] for job in jobs]


def make_small_images(out_dir: str | Path, n: int, size: tuple[int, int] = (64, 48),
                      seed: int = 0) -> list[Path]:
    """Write n tiny JPEGs of size (width, height); return their paths.

    Gradient plus noise, generated in vectorised chunks: 10k images take a
    few seconds, dominated by JPEG encoding.
    """
    out_dir = Path(out_dir)
    w, h = size
    params = {"kind": "small", "version": GENERATOR_VERSION, "n": n, "seed": seed,
              "size": [w, h], "quality": QUALITY}
    names = [f"{i:06d}.jpg" for i in range(n)]
    if (paths := _cached(out_dir, params, names)) is not None:
        return paths

    _prepare(out_dir, names)
    rng = np.random.default_rng([seed, 3])
    ramp_x = np.linspace(0, 1, w, dtype=np.float32)[None, None, :, None]
    ramp_y = np.linspace(0, 1, h, dtype=np.float32)[None, :, None, None]
    paths = [out_dir / name for name in names]
    chunk = 1000
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        c0, cx, cy = (rng.uniform(0, 255, (3, k, 1, 1, 3)).astype(np.float32))
        arr = c0 + (cx - c0) * ramp_x + (cy - c0) * ramp_y
        arr += rng.normal(0, 6, (k, h, w, 3)).astype(np.float32)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        for j in range(k):
            paths[start + j].write_bytes(_encode(arr[j]))
    _write_marker(out_dir, params)
    return paths


def _main() -> None:
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="tiny 64x48 images instead")
    args = ap.parse_args()
    t0 = time.perf_counter()
    make = make_small_images if args.small else make_jpeg_mix
    paths = make(args.out_dir, args.n, seed=args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} images, {total / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    _main()
