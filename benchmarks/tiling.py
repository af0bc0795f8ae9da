"""Sliced inference (`--tile`) against SAHI: small objects found, and tiles/s, all measured in one
invocation on the same images, models and slice settings.

1. Recall (the exact analytic detector): large JPEGs with 4 px squares, some cut by a tile seam
   or at a tile corner; found = a box of the right class with every corner within 3 px. bulkdet
   without tiles, `--tile 640 --no-tile-full`, `--tile 640`; SAHI's standard prediction, sliced,
   sliced + standard.
2. Throughput, model-bound (the YOLOv8n-architecture model of benchmarks/yolov8n.py, on
   photo-like 4000 x 3000 JPEGs, for which it was calibrated to give a realistic few tens of
   boxes): `bulkdet run --tile 640 --no-tile-full` against SAHI's `get_sliced_prediction` with its Ultralytics
   wrapper over the same ONNX file (given Ultralytics' export metadata, so it runs dynamic
   batches), at SAHI's slice batch 1 and 8; and ONNX Runtime alone on one tile at batch 1 (the
   model's own rate on this machine, which bounds both). The boxes of both are compared; no
   per-image cap (--max-det) binds, as SAHI has none.
3. Throughput, pipeline-bound: the same with the analytic detector, whose cost is near nothing:
   what is left is each tool's own work per tile (decode, cut, letterbox, post-process, merge),
   which is what bounds a tool once the model runs on a GPU.
4. Memory: a 100-megapixel JPEG run with --tile 640 --no-tile-full and without --tile; peak RSS.

SAHI runs in its own environment (torch, Ultralytics, SAHI: about 6 GB), which `make
bench-tiling` makes in .venv-sahi; `--sahi-python` names it. Without it parts 1-4 run for
bulkdet alone.

    python -m benchmarks.tiling [--images 8] [--sahi-python .venv-sahi/bin/python] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.dataset import jpeg_folder, make_photos
from benchmarks.run import measure_process
from bulkdet.choices import MAX_DET, TileMatch
from bulkdet.ingest.pack import pack
from bulkdet.results.report import summarize
from bulkdet.run.tiles import overlap_matrix, windows
from bulkdet.store.parts import read_detections
from bulkdet.synthetic import Rect, build_analytic_detector, write_image

PEER = Path(__file__).with_name("sahi_peer.py")
W, H, TILE, OVERLAP, SIDE = 4000, 3000, 640, 0.2, 4
# Ultralytics' defaults (SAHI's wrapper passes only conf), so both run the same thresholds.
CONF, IOU = 0.25, 0.7


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


def recall(truth: list[dict], dets: list[dict], within: float = 3.0) -> dict:
    found = sum(any(d["path"] == t["path"] and d["class_id"] == r[0] and
                    max(abs(a - b) for a, b in zip((d["x1"], d["y1"], d["x2"], d["y2"]), r[1:])) <= within
                    for d in dets) for t in truth for r in t["rects"])
    total = sum(len(t["rects"]) for t in truth)
    per_class: dict = {}
    for d in dets:
        per_class[(d["path"], d["class_id"])] = per_class.get((d["path"], d["class_id"]), 0) + 1
    return {"found": found, "objects": total, "recall": round(found / total, 3),
            "duplicates": sum(n - 1 for n in per_class.values())}


def bulkdet(dataset: Path, model: Path, out: Path, work: Path, *extra) -> tuple[dict, list[dict]]:
    """One `bulkdet run` in its own process: timings (the process's and the run's steady rate from
    its metrics, without process start and model load) and its detections."""
    m = measure_process([sys.executable, "-m", "bulkdet", "run", str(dataset), "--model", str(model), "--out",
                         str(out), "--overwrite", "-q", "--iou", str(IOU), *map(str, extra)], work / f"{out.name}.log")
    steady = summarize(out)
    run = {"wall_s": round(m["wall_s"], 2), "cpu_s": round(m["cpu_s"], 2), "peak_rss_mb": round(m["peak_rss_mb"]),
           "steady_tiles_per_s": round(steady.get("tiles_per_s") or 0, 2),
           "stage_s": {k: round(v, 3) for k, v in steady["stage_s"].items()}}
    return run, read_detections(out).to_pylist()


def sahi(python: str, images: Path, model: Path, work: Path, mode: str, batch_size: int = 1) -> tuple[dict, list[dict]]:
    """SAHI in its own process and environment (benchmarks/sahi_peer.py): timings and detections."""
    out = work / f"sahi_{model.stem}_{mode}_b{batch_size}.json"
    m = measure_process([python, str(PEER), str(images), str(model), "--mode", mode, "--tile", str(TILE),
                         "--overlap", str(OVERLAP), "--conf", str(CONF), "--batch-size", str(batch_size),
                         "--out", str(out)], out.with_suffix(".log"))
    r = json.loads(out.read_text())
    run = {"wall_s": round(m["wall_s"], 2), "cpu_s": round(m["cpu_s"], 2), "peak_rss_mb": round(m["peak_rss_mb"]),
           "batch_size": batch_size}
    if r["slices"]:
        run["steady_tiles_per_s"] = round(r["slices"] / r["loop_s"], 2)
    return run, r["detections"]


def _by_class(dets: list[dict]) -> dict:
    out: dict = {}
    for d in dets:
        out.setdefault((d["path"], d["class_id"]), []).append([d["x1"], d["y1"], d["x2"], d["y2"]])
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def agreement(ours: list[dict], theirs: list[dict], iou: float = 0.9) -> dict:
    """The two ran the same model on the same tiles: how many of each one's boxes the other has
    (same image and class, IoU >= iou), and how many boxes each left that still match another of
    their class by the merge's own rule (IoS > 0.5): fragments the merge should have joined."""
    a, b = _by_class(ours), _by_class(theirs)

    def found(x: dict, y: dict) -> int:
        return sum(int((overlap_matrix(boxes, y[k], TileMatch.IOU) >= iou).any(axis=1).sum()) for k, boxes in x.items() if k in y)

    def unmerged(x: dict) -> int:
        n = 0
        for boxes in x.values():
            m = overlap_matrix(boxes, boxes, TileMatch.IOS) > 0.5
            np.fill_diagonal(m, False)
            n += int(m.any(axis=1).sum())
        return n

    return {"bulkdet_boxes": len(ours), "sahi_boxes": len(theirs),
            "sahi_found_by_bulkdet": round(found(b, a) / max(len(theirs), 1), 3),
            "bulkdet_found_by_sahi": round(found(a, b) / max(len(ours), 1), 3),
            "bulkdet_unmerged": unmerged(a), "sahi_unmerged": unmerged(b)}


def model_only(model: Path, seconds: float = 10.0) -> float:
    """ONNX Runtime alone (its default session), one 640 x 640 tile at a time: tiles/s."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, TILE, TILE), dtype=np.float32)}
    session.run(None, x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, x)
        n += 1
    return round(n / (time.perf_counter() - t0), 2)


def with_ultralytics_metadata(src: Path, dst: Path, names: list[str]) -> Path:
    from benchmarks.yolov8n import describe  # torch: imported only where needed (gpu_check imports this module)

    m = onnx.load(str(src))
    describe(m, f"{src.stem}, for benchmarks", names)
    onnx.save(m, str(dst))
    return dst


def ratio(a: dict, b: dict, key: str = "steady_tiles_per_s") -> float:
    return round(a[key] / b[key], 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--sahi-python", default=None, help="the python of the SAHI environment (.venv-sahi/bin/python)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bulkdet-tiling-"))
    src = work / "src"
    truth = make_images(src, args.images)
    pack(src, work / "ds", quiet=True)
    analytic = with_ultralytics_metadata(build_analytic_detector(work / "analytic.onnx"), work / "analytic.onnx",
                                         ["red", "green", "blue"])
    from benchmarks.yolov8n import ensure_model

    yolo = ensure_model(work / "models")
    n_tiles = len(windows(W, H, TILE, OVERLAP)) * args.images
    r: dict = {"images": args.images, "size": [W, H], "tile": TILE, "overlap": OVERLAP, "tiles": n_tiles,
               "square_px": SIDE, "conf": CONF, "iou": IOU}
    peer = args.sahi_python

    # 1 and 3. recall, and the pipeline-bound rate (the analytic detector costs next to nothing)
    tile = ("--tile", TILE)
    for label, extra, mode in (("no_tiles", (), "standard"), ("tiles", tile + ("--no-tile-full",), "sliced"),
                               ("tiles_full", tile, "sliced_full")):
        run, dets = bulkdet(work / "ds", analytic, work / f"analytic_{label}", work, *extra)
        r[f"bulkdet_analytic_{label}"] = {**run, **recall(truth, dets)}
        if peer:
            run, dets = sahi(peer, src, analytic, work, mode)
            r[f"sahi_analytic_{mode}"] = {**run, **recall(truth, dets)}
    # Each tool's own work a tile, outside the model: what stays on the CPU once a GPU runs the model.
    analytic_rate = model_only(analytic)
    stages = r["bulkdet_analytic_tiles"]["stage_s"]
    r["outside_model_ms_per_tile"] = {
        "bulkdet_read_decode_post_write": round(1000 * sum(v for k, v in stages.items() if k != "infer") / n_tiles, 2),
        "bulkdet_post_write": round(1000 * (stages["postprocess"] + stages["write"]) / n_tiles, 2)}
    if peer:
        run, _ = sahi(peer, src, analytic, work, "sliced", batch_size=8)
        r["sahi_analytic_sliced_b8"] = run
        best = max(r["sahi_analytic_sliced"], run, key=lambda x: x["steady_tiles_per_s"])
        r["pipeline_bound_ratio"] = ratio(r["bulkdet_analytic_tiles"], best)
        # SAHI's loop is sequential: a slice's time less the model's is its own work.
        r["outside_model_ms_per_tile"]["sahi"] = round(1000 * (1 / best["steady_tiles_per_s"] - 1 / analytic_rate), 2)
    print(json.dumps(r, indent=1), flush=True)

    # 2. the model-bound rate: YOLOv8n on every tile
    photos = jpeg_folder(make_photos(work / "photos-gen", args.images, size=(W, H)), work / "photos")
    pack(photos, work / "ds_photos", quiet=True)
    r["model_only_tiles_per_s"] = {"yolov8n": model_only(yolo), "analytic": analytic_rate}
    run, ours = bulkdet(work / "ds_photos", yolo, work / "yolo_tiles", work, *tile, "--no-tile-full",
                        "--max-det", MAX_DET)
    r["bulkdet_yolo_tiles"] = run
    if peer:
        for b in (1, 8):
            run, theirs = sahi(peer, photos, yolo, work, "sliced", batch_size=b)
            r[f"sahi_yolo_sliced_b{b}"] = run
        r["yolo_agreement"] = agreement(ours, theirs)
        best = max(r["sahi_yolo_sliced_b1"], r["sahi_yolo_sliced_b8"], key=lambda x: x["steady_tiles_per_s"])
        r["model_bound_ratio"] = ratio(r["bulkdet_yolo_tiles"], best)
        r["model_bound_ratio_wall"] = ratio(best, r["bulkdet_yolo_tiles"], "wall_s")
    print(json.dumps(r, indent=1), flush=True)

    # 4. memory: one 100-megapixel JPEG (10000 x 10000), tiled and not
    (work / "big").mkdir(exist_ok=True)
    write_image(work / "big" / "big.jpg", 10_000, 10_000, [Rect(0, 5000, 5000, 5000 + SIDE, 5000 + SIDE)])
    pack(work / "big", work / "ds_big", quiet=True, max_pixels=200_000_000)
    r["memory_100mp"] = {
        "tiles": bulkdet(work / "ds_big", analytic, work / "big_tiles", work, *tile, "--no-tile-full")[0],
        "no_tiles": bulkdet(work / "ds_big", analytic, work / "big_plain", work)[0],
    }
    print(json.dumps(r, indent=1))
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
