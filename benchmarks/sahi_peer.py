"""The peer of `benchmarks.tiling`: SAHI's sliced prediction with its Ultralytics wrapper.

Runs in the benchmark's own SAHI environment (torch, Ultralytics and SAHI; see docs/tiling.md),
never in bulkdet's: it imports nothing of bulkdet, reads the images from a folder, and prints
to --out one JSON object: the timings and every detection in original pixels.

    python benchmarks/sahi_peer.py IMAGES MODEL --mode sliced|sliced_full|standard
        --out RESULT.json [--tile 640] [--overlap 0.2] [--conf 0.25] [--batch-size 1]

`--batch-size` is SAHI's own (slices of one image per model call); images go one at a time, as
in SAHI's folder mode.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--mode", choices=("sliced", "sliced_full", "standard"), default="sliced")
    ap.add_argument("--tile", type=int, default=640)
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="write the JSON here (Ultralytics prints to stdout)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import numpy as np
    from PIL import Image
    from sahi import AutoDetectionModel
    from sahi.predict import get_prediction, get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    model = AutoDetectionModel.from_pretrained(model_type="ultralytics", model_path=str(args.model),
                                               confidence_threshold=args.conf, device="cpu",
                                               image_size=args.tile)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    # One warm-up call outside the timed loop, as bulkdet's steady rate leaves out its start.
    with Image.open(paths[0]) as im:
        model.perform_inference(np.asarray(im.convert("RGB"))[: args.tile, : args.tile])
    t_ready = time.perf_counter()

    detections, slices = [], 0
    for path in paths:
        if args.mode == "standard":
            result = get_prediction(str(path), model)
        else:
            result = get_sliced_prediction(
                str(path), model, slice_height=args.tile, slice_width=args.tile,
                overlap_height_ratio=args.overlap, overlap_width_ratio=args.overlap,
                perform_standard_pred=args.mode == "sliced_full", postprocess_type="GREEDYNMM",
                postprocess_match_metric="IOS", postprocess_match_threshold=0.5, verbose=0,
                batch_size=args.batch_size)
            with Image.open(path) as im:
                w, h = im.size
            slices += len(get_slice_bboxes(h, w, args.tile, args.tile, False, args.overlap, args.overlap))
        for p in result.object_prediction_list:
            x1, y1, x2, y2 = p.bbox.to_xyxy()
            detections.append({"path": path.name, "class_id": int(p.category.id), "score": float(p.score.value),
                               "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    t_end = time.perf_counter()
    args.out.write_text(json.dumps({"images": len(paths), "slices": slices, "loop_s": t_end - t_ready,
                                    "start_s": t_ready - t_start, "detections": detections}))


if __name__ == "__main__":
    main()
