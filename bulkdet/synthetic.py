"""Synthetic data with a known truth: images of coloured rectangles and an analytic reference detector.

The demo, the tests and the benchmarks make their data here. Nothing is downloaded. The
"detector" is an exact, hand-built ONNX graph that finds solid red / green / blue rectangles,
so the whole pipeline (LMDB -> DALI decode -> letterbox -> ONNX Runtime -> Parquet) can be run
and checked against known ground truth (`compare_with_truth`).

Its documented limitation: it reports at most ONE box per class per image -- the
bounding box of all pixels of that colour.  The demo images therefore never
contain two rectangles of the same class.

Output follows the YOLOv8 / YOLO11 layout ``[B, 4 + nc, N]`` with nc = 3 classes
and N = 3 anchors, anchor n being class n, so the normal YOLO post-processing
code applies unchanged.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

CLASS_NAMES = ("red", "green", "blue")
CLASS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))

# A pixel belongs to class c when channel c exceeds both other channels by more
# than this.  Pure colours give 1.0; gray (incl. the 114 letterbox padding) gives
# 0; the demo background stays below 0.07.  0.5 puts blurred edges at the
# half-way point, i.e. where the true edge was.
MASK_THRESHOLD = 0.5

OPSET = 17
# IR 8 is the version that introduced opset 17: the oldest IR this model can
# declare, so it loads in every onnxruntime that knows opset 17.
IR_VERSION = 8


# --------------------------------------------------------------------------
# Analytic detector
# --------------------------------------------------------------------------

def build_analytic_detector(path) -> pathlib.Path:
    """Write the analytic colour-rectangle detector to ``path`` (ONNX, opset 17).

    Input ``images``: float32 [batch, 3, height, width], RGB in 0..1.
    Output ``output0``: float32 [batch, 7, 3]: rows 0..3 = cx, cy, w, h in input
    pixels, rows 4..6 = class scores; anchor n carries class n only.
    Absent classes get score 0 and an all-zero box.
    """
    path = pathlib.Path(path)
    C = helper.make_tensor
    F = TensorProto.FLOAT
    I64 = TensorProto.INT64
    nodes = [
        # For every class c, the max of the two OTHER channels: [B,3,2,H,W] -> [B,3,H,W].
        helper.make_node("Gather", ["images", "other_idx"], ["others"], axis=1),
        helper.make_node("ReduceMax", ["others"], ["others_max"], axes=[2], keepdims=0),
        helper.make_node("Sub", ["images", "others_max"], ["diff"]),
        helper.make_node("Greater", ["diff", "thresh"], ["mask_b"]),
        helper.make_node("Cast", ["mask_b"], ["mask"], to=F),            # [B,3,H,W]
        # Profiles: is there a pixel of class c in this column / row?
        helper.make_node("ReduceMax", ["mask"], ["col"], axes=[2], keepdims=0),  # [B,3,W]
        helper.make_node("ReduceMax", ["mask"], ["row"], axes=[3], keepdims=0),  # [B,3,H]
        # First / last set index; +1 makes x2, y2 exclusive edges.
        helper.make_node("ArgMax", ["col"], ["x1_i"], axis=2, keepdims=0),
        helper.make_node("ArgMax", ["col"], ["x2l_i"], axis=2, keepdims=0, select_last_index=1),
        helper.make_node("ArgMax", ["row"], ["y1_i"], axis=2, keepdims=0),
        helper.make_node("ArgMax", ["row"], ["y2l_i"], axis=2, keepdims=0, select_last_index=1),
        helper.make_node("Cast", ["x1_i"], ["x1"], to=F),
        helper.make_node("Cast", ["x2l_i"], ["x2l"], to=F),
        helper.make_node("Cast", ["y1_i"], ["y1"], to=F),
        helper.make_node("Cast", ["y2l_i"], ["y2l"], to=F),
        helper.make_node("Add", ["x2l", "one"], ["x2"]),
        helper.make_node("Add", ["y2l", "one"], ["y2"]),
        # 1 if the colour occurs anywhere, else 0.
        helper.make_node("ReduceMax", ["col"], ["score"], axes=[2], keepdims=0),  # [B,3]
        # cx, cy, w, h (each [B,3]).
        helper.make_node("Add", ["x1", "x2"], ["xs"]),
        helper.make_node("Mul", ["xs", "half"], ["cx"]),
        helper.make_node("Add", ["y1", "y2"], ["ys"]),
        helper.make_node("Mul", ["ys", "half"], ["cy"]),
        helper.make_node("Sub", ["x2", "x1"], ["w"]),
        helper.make_node("Sub", ["y2", "y1"], ["h"]),
    ]
    for name in ("cx", "cy", "w", "h", "score"):
        nodes.append(helper.make_node("Unsqueeze", [name, "axis1"], [name + "_u"]))  # [B,1,3]
    nodes += [
        helper.make_node("Concat", ["cx_u", "cy_u", "w_u", "h_u"], ["box_raw"], axis=1),
        # Absent class: ArgMax of an all-zero profile gives 0..W; zero it instead.
        helper.make_node("Mul", ["box_raw", "score_u"], ["box"]),          # [B,4,3]
        # Class rows: anchor n scores only in row 4+n.
        helper.make_node("Mul", ["score_u", "eye"], ["cls"]),              # [B,3,3]
        helper.make_node("Concat", ["box", "cls"], ["output0"], axis=1),   # [B,7,3]
    ]
    inits = [
        C("other_idx", I64, [3, 2], [1, 2, 0, 2, 0, 1]),
        C("thresh", F, [], [MASK_THRESHOLD]),
        C("one", F, [], [1.0]),
        C("half", F, [], [0.5]),
        C("axis1", I64, [1], [1]),
        C("eye", F, [1, 3, 3], np.eye(3, dtype=np.float32).ravel().tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "analytic_color_rect_detector",
        [helper.make_tensor_value_info("images", F, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("output0", F, ["batch", 4 + len(CLASS_NAMES), len(CLASS_NAMES)])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="bulkdet.demo",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {
        # Same format as Ultralytics exports, so one metadata parser serves both.
        "names": str(dict(enumerate(CLASS_NAMES))),
        "stride": "32",
        "task": "detect",
        "description": (
            "Analytic colour-rectangle detector for demos and tests: finds the bounding "
            "box of solid red, green and blue pixels (at most one box per class per "
            "image), YOLOv8 output layout. Not a trained model."
        ),
    })
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rect:
    """A filled rectangle in pixels of the UPRIGHT image; x2, y2 are exclusive."""
    class_id: int
    x1: int
    y1: int
    x2: int
    y2: int

    def as_list(self) -> list[int]:
        return [self.class_id, self.x1, self.y1, self.x2, self.y2]


def _min_side(dim: int) -> int:
    return max(8, math.ceil(0.10 * dim))


def random_rects(width: int, height: int, n: int, rng) -> list[Rect]:
    """1..3 non-overlapping rectangles of distinct classes, sorted by class.

    ``rng`` is a numpy Generator (or a seed).  Rectangles keep a gap of ~4% of the
    longer side from each other and from the border (the border gap is capped at
    1/8 of a short dimension so thin images still fit), and each side is at least
    max(8 px, 10% of that dimension).  This keeps edges apart after a downscale to
    640 and a bilinear blur.  ``n`` is reduced when the space does not allow it.
    """
    rng = np.random.default_rng(rng)
    if min(width, height) < 16:
        raise ValueError(f"image {width}x{height} too small for demo rectangles")
    n = int(np.clip(n, 1, 3))
    gap = max(4, math.ceil(0.04 * max(width, height)))
    mins = (_min_side(width), _min_side(height))
    margins = (min(gap, width // 8), min(gap, height // 8))
    dims = (width, height)

    def place_one():
        lo_hi = []
        for d, m, mn in zip(dims, margins, mins):
            avail = d - 2 * m
            size = int(rng.integers(mn, max(mn, int(0.4 * avail)) + 1))
            start = int(rng.integers(m, d - m - size + 1))
            lo_hi.append((start, start + size))
        return lo_hi

    def apart(a, b):
        # Separated by >= gap along x or along y.
        return any(a[k][0] >= b[k][1] + gap or b[k][0] >= a[k][1] + gap for k in (0, 1))

    classes = [int(c) for c in rng.permutation(3)]
    for k in range(n, 0, -1):
        for _ in range(200):
            boxes = []
            for _ in range(k):
                box = place_one()
                if not all(apart(box, other) for other in boxes):
                    break
                boxes.append(box)
            if len(boxes) == k:
                rects = [Rect(c, bx[0][0], bx[1][0], bx[0][1], bx[1][1])
                         for c, bx in zip(classes, boxes)]
                return sorted(rects, key=lambda r: r.class_id)
    raise AssertionError("unreachable: a single rectangle always fits")


# EXIF orientation -> the transpose that turns the UPRIGHT image into the stored
# one, i.e. the inverse of what a viewer (ImageOps.exif_transpose) applies.
_STORE_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,    # viewer applies ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,   # viewer applies ROTATE_90
}


def draw_upright(width: int, height: int, rects, seed: int = 0) -> np.ndarray:
    """The upright image as uint8 [height, width, 3]: gray noise + pure-colour rects."""
    rng = np.random.default_rng(seed)
    # Low-saturation background: gray 40..160 plus +-8 per channel, so that
    # channel - max(other channels) <= 16/255 < 0.15 everywhere.
    gray = rng.integers(40, 161, size=(height, width, 1), dtype=np.int16)
    noise = rng.integers(-8, 9, size=(height, width, 3), dtype=np.int16)
    img = (gray + noise).astype(np.uint8)
    for r in rects:
        img[r.y1:r.y2, r.x1:r.x2] = CLASS_COLORS[r.class_id]
    return img


def write_image(path, width: int, height: int, rects, fmt: str = "jpeg",
                orientation: int = 1, seed: int = 0) -> pathlib.Path:
    """Write an image that a viewer honouring EXIF ``orientation`` shows upright
    (``width`` x ``height``, ``rects`` in upright pixels).

    JPEG is quality 95, 4:4:4 chroma, so colour edges stay within ~1 px.
    """
    path = pathlib.Path(path)
    fmt = fmt.lower()
    if fmt not in ("jpeg", "jpg", "png"):
        raise ValueError(f"unsupported format {fmt!r}")
    if orientation not in range(1, 9):
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")
    img = Image.fromarray(draw_upright(width, height, rects, seed), "RGB")
    kwargs = {}
    if orientation != 1:
        img = img.transpose(_STORE_TRANSPOSE[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    if fmt == "png":
        img.save(path, format="PNG", **kwargs)
    else:
        img.save(path, format="JPEG", quality=95, subsampling=0, **kwargs)
    return path


def make_demo_images(out_dir, n: int = 48, seed: int = 0, truth_path=None) -> list[dict]:
    """Write a deterministic, varied demo set into ``out_dir``, the truth to ``truth_path``.

    ``truth_path`` defaults to ``truth.json`` beside ``out_dir`` (not inside: it would be
    packed as an input).
    Sizes 64..2000 px (square, very tall, very wide, random), JPEG and PNG, EXIF
    orientations 1/3/6/8, 1-3 rectangles each, some files in sub-folders.
    Returns the truth list: {"path", "width", "height", "orientation",
    "rects": [[class_id, x1, y1, x2, y2], ...]} with upright sizes / pixels.
    """
    out_dir = pathlib.Path(out_dir)
    rng = np.random.default_rng(seed)
    # The extremes come first so that even a small n covers them.
    fixed = [(64, 64), (64, 2000), (2000, 64), (1920, 1080), (1080, 1920),
             (640, 640), (2000, 1500), (100, 1200), (1200, 100), (333, 517)]
    folders = ["", "", "", "set_a", "set_b/deeper"]
    truth = []
    for i in range(n):
        if i < len(fixed):
            w, h = fixed[i]
        else:
            # Log-uniform long side and aspect ratio up to 4:1, clamped to 64..2000.
            long = math.exp(rng.uniform(math.log(96), math.log(2000)))
            aspect = math.exp(rng.uniform(-math.log(4), math.log(4)))
            w = int(np.clip(round(long * min(1.0, aspect)), 64, 2000))
            h = int(np.clip(round(long * min(1.0, 1 / aspect)), 64, 2000))
        orientation = (1, 3, 6, 8)[i % 4]
        fmt = "jpeg" if (i // 4) % 2 == 0 else "png"  # all 8 combos in every 8 images
        rects = random_rects(w, h, int(rng.integers(1, 4)), rng)
        rel = pathlib.PurePosixPath(folders[i % len(folders)],
                                    f"img_{i:03d}.{'jpg' if fmt == 'jpeg' else 'png'}")
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(out_dir / rel, w, h, rects, fmt=fmt, orientation=orientation,
                    seed=seed * 100_003 + i)
        truth.append({"path": str(rel), "width": w, "height": h,
                      "orientation": orientation,
                      "rects": [r.as_list() for r in rects]})
    truth_path = pathlib.Path(truth_path or out_dir.parent / "truth.json")
    truth_path.write_text(json.dumps(truth, indent=1))
    return truth


def box_tolerance(width: int, height: int, imgsz: int = 640) -> float:
    """Corner tolerance in original pixels: resizing to imgsz blurs edges by ~1 input pixel."""
    return max(2.0, 2.5 * max(width, height) / imgsz)


def compare_with_truth(truth: list[dict], detections: list[dict], imgsz: int = 640) -> list[str]:
    """Every truth rectangle found once, right class, corners within tolerance, nothing extra.

    `detections` are rows with path, class_id, x1, y1, x2, y2. Returns the problems found.
    """
    by_path: dict[str, list[dict]] = {}
    for d in detections:
        by_path.setdefault(d["path"], []).append(d)
    problems = []
    for t in truth:
        tol = box_tolerance(t["width"], t["height"], imgsz)
        dets = by_path.pop(t["path"], [])
        found = {d["class_id"]: d for d in dets}
        if len(found) != len(dets):
            problems.append(f"{t['path']}: {len(dets) - len(found)} duplicate box(es)")
        expected = {r[0]: r[1:] for r in t["rects"]}
        for cls in sorted(set(found) | set(expected)):
            if cls not in found:
                problems.append(f"{t['path']}: missed {CLASS_NAMES[cls]} {expected[cls]}")
            elif cls not in expected:
                problems.append(f"{t['path']}: extra {CLASS_NAMES[cls]} box")
            else:
                d = found[cls]
                err = max(abs(a - b) for a, b in zip((d["x1"], d["y1"], d["x2"], d["y2"]), expected[cls]))
                if err > tol:
                    problems.append(f"{t['path']}: {CLASS_NAMES[cls]} corner off by {err:.1f} px (tolerance {tol:.1f})")
    problems += [f"{p}: detections for an image not in the truth" for p in by_path]
    return problems
