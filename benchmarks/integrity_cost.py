"""What pack's structure check (bulkdet/ingest/integrity.py) costs per image, next to the
sha256 pack computes anyway: 1920x1080 JPEGs (baseline and progressive) and a PNG.

    PYTHONPATH=. python benchmarks/integrity_cost.py [--repeat 200] [--noise 12]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time

import numpy as np
from PIL import Image

from bulkdet.synthetic import draw_upright, random_rects
from bulkdet.ingest.integrity import structure_problem


def _best_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--noise", type=int, default=12, help="pixel noise (+-): more noise, bigger files")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w, h = 1920, 1080
    rgb = draw_upright(w, h, random_rects(w, h, 3, rng), seed=1).astype(np.int16)
    rgb = np.clip(rgb + rng.integers(-args.noise, args.noise + 1, rgb.shape), 0, 255).astype(np.uint8)
    cases = []
    for name, fmt, kwargs in (("jpeg q90", "JPEG", {"quality": 90}),
                              ("jpeg q90 progressive", "JPEG", {"quality": 90, "progressive": True}),
                              ("png", "PNG", {})):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
        cases.append((name, fmt.lower(), buf.getvalue()))
    print(f"{'image 1920x1080':24} {'MB':>6} {'check ms':>9} {'sha256 ms':>10}")
    for name, fmt, data in cases:
        assert structure_problem(data, fmt) is None
        check = _best_ms(lambda: structure_problem(data, fmt), args.repeat)
        sha = _best_ms(lambda: hashlib.sha256(data).digest(), args.repeat)
        print(f"{name:24} {len(data) / 1e6:6.2f} {check:9.3f} {sha:10.3f}")


if __name__ == "__main__":
    main()
