"""Sliced inference (`--tile`): small objects found, and tiles/s batched across images vs. one
image at a time, all measured in one invocation on the same images, model and tiles.

1. Recall (the exact analytic detector): large JPEGs with 4 px squares, some cut by a tile
   seam or at a tile corner; found = a box of the right class with every corner within 3 px.
   Runs: no tiling, --tile 640 --no-tile-full, --tile 640 (with the full pass).
2. Throughput (the YOLOv8n-architecture model of benchmarks/yolov8n.py): `bulkdet run --tile
   640 --no-tile-full`, whose tiles of many images fill the same batches while decoding
   overlaps inference, against the loop SAHI's folder mode runs: one image at a time,
   decoded (Pillow), cut into the same tiles, one model call per tile (ONNX Runtime, batch 1),
   merged (bulkdet's own merge, so only the scheduling differs). SAHI itself needs torch with
   Ultralytics (about 6 GB, see docs/tiling.md); this loop is its schedule without its
   overheads, so the ratio is a lower bound of the one against SAHI.
3. Memory: a 100-megapixel JPEG run with --tile 640 --no-tile-full and without --tile; peak RSS.

    python -m benchmarks.tiling [--images 8] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from benchmarks.run import measure_process
from benchmarks.yolov8n import ensure_model
from bulkdet.ingest.pack import pack
from bulkdet.results.report import summarize
from bulkdet.run.postprocess import nms, split_candidates
from bulkdet.run.tiles import TileSettings, merge, windows
from bulkdet.store.parts import read_detections
from bulkdet.synthetic import Rect, build_analytic_detector, write_image

W, H, TILE, SIDE = 4000, 3000, 640, 4
CONF, IOU = 0.25, 0.45


def make_images(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """n W x H JPEGs, three SIDE px squares each (one per class): anywhere, on the seam at
    x = 640, at the tile corner (640, 640)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = []
    for i in range(n):
        x, y = int(rng.integers(1300, W - 100)), int(rng.integers(1300, H - 100))
        rects = [Rect(0, x, y, x + SIDE, y + SIDE), Rect(1, 638, 200 + 37 * i, 638 + SIDE, 204 + 37 * i),
                 Rect(2, 637, 637, 637 + SIDE, 637 + SIDE)]
        write_image(folder / f"img_{i:03d}.jpg", W, H, rects, seed=seed * 1000 + i)
        truth.append({"path": f"img_{i:03d}.jpg", "rects": [r.as_list() for r in rects]})
    return truth


def recall(truth: list[dict], run_dir: Path, within: float = 3.0) -> dict:
    dets = read_detections(run_dir).to_pylist()
    found = sum(any(d["path"] == t["path"] and d["class_id"] == r[0] and
                    max(abs(a - b) for a, b in zip((d["x1"], d["y1"], d["x2"], d["y2"]), r[1:])) <= within
                    for d in dets) for t in truth for r in t["rects"])
    total = sum(len(t["rects"]) for t in truth)
    per_class = {}
    for d in dets:
        per_class[(d["path"], d["class_id"])] = per_class.get((d["path"], d["class_id"]), 0) + 1
    return {"found": found, "objects": total, "recall": round(found / total, 3),
            "duplicates": sum(n - 1 for n in per_class.values())}


def bulkdet(dataset: Path, model: Path, out: Path, work: Path, *extra) -> dict:
    m = measure_process([sys.executable, "-m", "bulkdet", "run", str(dataset), "--model", str(model), "--out",
                         str(out), "--overwrite", "-q", *map(str, extra)], work / f"{out.name}.log")
    return {"wall_s": round(m["wall_s"], 2), "cpu_s": round(m["cpu_s"], 2), "peak_rss_mb": round(m["peak_rss_mb"])}


def one_image_at_a_time(images: list[Path], model: Path) -> dict:
    """SAHI's schedule: per image, decode, cut the tiles, one model call per tile, merge."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    settings = TileSettings(TILE, full=False)
    tiles = 0
    t0 = time.perf_counter()
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        parts = []
        for x0, y0, x1, y1 in windows(rgb.shape[1], rgb.shape[0], TILE, settings.overlap).tolist():
            x = np.ascontiguousarray(rgb[y0:y1, x0:x1].transpose(2, 0, 1)[None], np.float32) / 255.0
            boxes, scores, classes = split_candidates(session.run(None, {name: x})[0], "yolov8")
            keep = np.flatnonzero(scores[0] > CONF)
            b, s, c = boxes[0][keep], scores[0][keep], classes[0][keep]
            kept = nms(b + (c * 1e5)[:, None], s, IOU) if len(s) else np.zeros(0, np.int64)
            parts.append((b[kept] + [x0, y0, x0, y0], s[kept], c[kept], np.ones(len(kept), bool)))
            tiles += 1
        merge(*(np.concatenate(p) for p in zip(*parts)), settings, 300)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "tiles": tiles, "tiles_per_s": round(tiles / wall, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bulkdet-tiling-"))
    truth = make_images(work / "src", args.images)
    pack(work / "src", work / "ds", quiet=True)
    analytic = build_analytic_detector(work / "analytic.onnx")
    yolo = ensure_model(work / "models")
    r: dict = {"images": args.images, "size": [W, H], "tile": TILE, "square_px": SIDE}

    # 1. recall
    tile = ("--tile", TILE)
    for label, extra in (("no_tiles", ()), ("tiles", tile + ("--no-tile-full",)), ("tiles_full", tile)):
        bulkdet(work / "ds", analytic, work / f"recall_{label}", work, *extra)
        r[f"recall_{label}"] = recall(truth, work / f"recall_{label}")

    # 2. tiles/s: batched across images (bulkdet) vs one image at a time (SAHI's loop)
    run = bulkdet(work / "ds", yolo, work / "yolo_tiles", work, *tile, "--no-tile-full")
    n_tiles = len(windows(W, H, TILE, 0.2)) * args.images
    steady = summarize(work / "yolo_tiles")  # the pipeline's own rate, without process start and model load
    r["bulkdet_tiles"] = {**run, "tiles": n_tiles, "tiles_per_s": round(n_tiles / run["wall_s"], 2),
                          "steady_tiles_per_s": round(steady["tiles_per_s"], 2)}
    r["one_image_at_a_time"] = one_image_at_a_time(sorted((work / "src").glob("*.jpg")), yolo)
    r["tiles_per_s_ratio"] = round(r["bulkdet_tiles"]["tiles_per_s"] / r["one_image_at_a_time"]["tiles_per_s"], 2)

    print(json.dumps(r, indent=1), flush=True)

    # 3. memory: one 100-megapixel JPEG (10000 x 10000), tiled and not
    (work / "big").mkdir(exist_ok=True)
    write_image(work / "big" / "big.jpg", 10_000, 10_000, [Rect(0, 5000, 5000, 5000 + SIDE, 5000 + SIDE)])
    pack(work / "big", work / "ds_big", quiet=True, max_pixels=200_000_000)
    r["memory_100mp"] = {
        "tiles": bulkdet(work / "ds_big", analytic, work / "big_tiles", work, *tile, "--no-tile-full"),
        "no_tiles": bulkdet(work / "ds_big", analytic, work / "big_plain", work),
    }
    print(json.dumps(r, indent=1))
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
