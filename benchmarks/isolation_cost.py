"""What one broken image costs a batch: decode time of a batch with one bad image, relative
to the same batch without it, measured in one run (DALI on CPU).

    PYTHONPATH=. python benchmarks/isolation_cost.py [--batch 32] [--size 640] [--repeat 5] [--bad text]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from bulkdet.run.decode import Decoder
from bulkdet.synthetic import draw_upright, random_rects
from bulkdet.run.plan import Batch, letterbox


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bad", choices=("truncated", "text"), default="truncated",
                    help="truncated: DALI names the failed sample; text: it does not (bisection)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    encoded = []
    for i in range(args.batch):
        buf = io.BytesIO()
        w, h = args.size, args.size * 3 // 4
        Image.fromarray(draw_upright(w, h, random_rects(w, h, 3, rng), seed=i)).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    broken = list(encoded)
    broken[args.batch // 3] = encoded[0][: len(encoded[0]) // 2] if args.bad == "truncated" else b"text " * 99
    w = np.full(args.batch, args.size, np.int32)
    h = np.full(args.batch, args.size * 3 // 4, np.int32)
    batch = Batch(0, 0, np.arange(args.batch), [""] * args.batch, [b""] * args.batch, w, h, (640, 640),
                  letterbox(w, h, 640, 640))
    decoder = Decoder("cpu", args.batch)
    runs = []
    real_run = decoder._run
    decoder._run = lambda e, b, idx: runs.append(len(idx)) or real_run(e, b, idx)

    def best(data) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            decoder.decode(batch, data)
            times.append(time.perf_counter() - t)
        return min(times)

    best(encoded)  # warm-up
    clean = best(encoded)
    runs.clear()
    with_bad = best(broken)
    print(f"batch {args.batch} x {args.size}px JPEG, best of {args.repeat}: clean {clean * 1e3:.1f} ms, "
          f"one {args.bad} {with_bad * 1e3:.1f} ms -> {with_bad / clean:.2f}x; "
          f"DALI runs per bad batch: {len(runs) // args.repeat} (one-by-one isolation needs {args.batch + 2})")


if __name__ == "__main__":
    main()
