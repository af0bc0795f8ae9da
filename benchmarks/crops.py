"""`bulkdet crops`: crops/s through DALI (the run's decoder, cutting regions) vs Pillow.

The demo data (bulkdet demo's images: 64..2000 px, JPEG and PNG, EXIF orientations, 1-3
rectangles each) is packed and run by the analytic detector; then its detections are cut
(a) by `bulkdet crops` (DALI, on `--device`) and (b) by the Pillow baseline crops used before:
each image read from the same dataset, decoded once by Pillow (EXIF applied), its crops cut and
saved. Both encode JPEG with Pillow at the same settings, with the same threads, into fresh
folders; the two alternate for `--repeat` rounds; the best and the median round are reported
(on a shared machine the rounds vary a lot).

    python -m benchmarks.crops [--images 400] [--threads 2] [--device cpu] [--repeat 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from bulkdet.ingest.pack import pack
from bulkdet.results.crops import JPEG_QUALITY, crops
from bulkdet.run.runner import RunConfig, run
from bulkdet.store.manifest import read_manifest
from bulkdet.store.readers import open_dataset_reader
from bulkdet.synthetic import build_analytic_detector, make_demo_images


def pillow_crops(dataset: Path, index: Path, out: Path, threads: int) -> int:
    """The baseline: the regions `bulkdet crops` cut (its crops.parquet), cut by Pillow."""
    rows = pq.read_table(index).to_pylist()
    by_image: dict[int, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    m = {r["image_id"]: r for r in read_manifest(dataset).select(["image_id", "shard", "key"]).to_pylist()}
    reader = open_dataset_reader(dataset)

    def one(image_rows: list[dict]) -> int:
        row = m[image_rows[0]["image_id"]]
        blob = reader.read(row["shard"], [row["image_id"]], [row["key"]])[0]
        with Image.open(io.BytesIO(blob)) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        for r in image_rows:
            path = out / r["crop_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            img.crop((r["crop_x1"], r["crop_y1"], r["crop_x2"], r["crop_y2"])).save(
                path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        return len(image_rows)

    try:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, by_image.values()))
    finally:
        reader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_demo_images(tmp / "images", n=args.images, truth_path=tmp / "truth.json")
        pack(tmp / "images", tmp / "dataset", quiet=True)
        model = build_analytic_detector(tmp / "analytic.onnx")
        run(RunConfig(tmp / "dataset", model, tmp / "run", device="cpu", quiet=True))
        dali, pil = [], []
        for _ in range(args.repeat):
            shutil.rmtree(tmp / "dali", ignore_errors=True)
            t = time.perf_counter()
            s = crops(tmp / "run", tmp / "dali", quiet=True, threads=args.threads, device=args.device)
            dali.append(s.written / (time.perf_counter() - t))
            shutil.rmtree(tmp / "pillow", ignore_errors=True)
            t = time.perf_counter()
            n = pillow_crops(tmp / "dataset", tmp / "dali" / "crops.parquet", tmp / "pillow", args.threads)
            pil.append(n / (time.perf_counter() - t))
            assert n == s.written == s.crops, (n, s)
    result = {"images": args.images, "crops": s.crops, "threads": args.threads, "device": args.device,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "dali_crops_per_s": round(max(dali), 1), "pillow_crops_per_s": round(max(pil), 1),
              "dali_over_pillow": round(max(dali) / max(pil), 2),
              "median_dali_crops_per_s": round(float(np.median(dali)), 1),
              "median_pillow_crops_per_s": round(float(np.median(pil)), 1),
              "median_dali_over_pillow": round(float(np.median(dali) / np.median(pil)), 2),
              "rounds": {"dali": [round(v, 1) for v in dali], "pillow": [round(v, 1) for v in pil]}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
