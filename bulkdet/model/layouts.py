"""The output layouts of detectors: which one a model has, and its outputs as candidate boxes.

One home for every layout (docs/models.md):

- `yolov8`  one output [B, 4+nc, N]: cx, cy, w, h in input pixels, class scores (YOLOv8, YOLO11, YOLO12)
- `yolov5`  one output [B, N, 5+nc]: cx, cy, w, h, objectness, class scores (YOLOv5, YOLOv7)
- `end2end` one output [B, K, 6]: x1, y1, x2, y2, score, class (YOLOv10, YOLO26, --nms-in-model)
- `detr`    one output [B, Q, 4+nc] (RT-DETR as Ultralytics exports it: probabilities), or two
            outputs boxes [B, Q, 4] + class scores or logits [B, Q, nc] (D-FINE, RF-DETR);
            boxes cx, cy, w, h normalised to 0..1 of the model input
- `boxes-scores` two outputs: boxes [B, N, 4] x1, y1, x2, y2 in input pixels and scores [B, N, nc]
            or [B, nc, N] (PaddleDetection's classes first), in either order (DAMO-YOLO, YOLO-NAS,
            PP-YOLOE without NMS)
- `nms4`    four outputs: num_dets [B, 1], boxes [B, K, 4] x1, y1, x2, y2, scores [B, K], classes [B, K]
            (EfficientNMS-style end-to-end exports), or the three last (labels, boxes, scores: RT-DETR
            and D-FINE exported with their post-processor and its orig_target_sizes input)

`detect` tells the layout from the outputs' names and shapes (None where a dimension is dynamic);
`decode` turns one batch of outputs into `Candidates` in input pixels, for run/postprocess.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUTS = ("yolov8", "yolov5", "end2end", "detr", "boxes-scores", "nms4")
NEED_NMS = ("yolov8", "yolov5", "boxes-scores")  # the others come out of the model final
DETR_BOX_RANGE = (-0.1, 1.5)  # normalised boxes (with some slack); input-pixel boxes exceed it
DETR_NAME_HINTS = ("logit", "label", "pred_")  # D-FINE / RF-DETR / DETR output names

Output = tuple[str, tuple]  # (name, shape), None for a dynamic dimension


class LayoutError(ValueError):
    """The model's outputs fit no layout (or not the one asked for): a user's mistake, one line."""


@dataclass
class Candidates:
    """One batch's candidate boxes, before the threshold, NMS and un-letterboxing.

    boxes [B, N, 4] x1, y1, x2, y2 in input pixels; scores [B, N]; class_ids [B, N];
    `valid`: per image, how many leading rows count (nms4's num_dets), None: all.
    `per_box` > 1: every (box, class) pair is a candidate (multi-label, as D-FINE's top-k and
    YOLO-NAS / PP-YOLOE's multiclass NMS): scores [B, N * nc], candidate k is box k // nc of class
    k % nc, class_ids None (never a [B, N * nc] copy of the boxes).
    `class_scores` [B, nc, N] (each box's best class, `_best_class`), class_ids None: the class is
    found only for the candidates kept; every box's best score is a max over the classes, several
    times cheaper than an argmax over all of them, which keeps host post-processing off a GPU
    run's critical path.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray | None
    valid: np.ndarray | None
    needs_nms: bool
    per_box: int = 1
    class_scores: np.ndarray | None = None

    def classes_of(self, i: int, keep: np.ndarray) -> np.ndarray:
        """The class ids of image i's candidates `keep` (indices into scores[i])."""
        if self.per_box > 1:
            return keep % self.per_box
        if self.class_ids is None:
            return self.class_scores[i][:, keep].argmax(0)
        return self.class_ids[i][keep]

    def take(self, i: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes, scores and class ids of image i's candidates `keep`."""
        boxes = self.boxes[i][keep if self.per_box == 1 else keep // self.per_box]
        return boxes, self.scores[i][keep], self.classes_of(i, keep)


def describe(outputs: list[Output]) -> str:
    """'output0 [1, 7, 3], output1 [1, 3]' ('?' for a dynamic dimension)."""
    return ", ".join(f"{name} [{', '.join('?' if d is None else str(d) for d in shape)}]" for name, shape in outputs)


def detect(outputs: list[Output], nc: int | None, end2end: bool = False, override: str | None = None,
           values: list[np.ndarray] | None = None) -> str | None:
    """The layout of a model with these outputs; None when it depends on a dimension that is
    dynamic (or, for two outputs with no telling names, on the values: give `values`, one batch's
    outputs, then). `override` (`run --layout`) wins when the shapes fit it.

    LayoutError (one line) when nothing fits.
    """
    outputs = [(name, tuple(shape)) for name, shape in outputs]
    if override is not None:
        if override not in LAYOUTS:
            raise LayoutError(f"--layout {override!r} is not one of {', '.join(LAYOUTS)}")
        fits = _fits(override, outputs, nc)
        if fits is False:
            raise LayoutError(f"the model's outputs {describe(outputs)} do not fit --layout {override} "
                              f"({_EXPECTED[override]}{f' for {nc} classes' if nc else ''})")
        return override
    n = len(outputs)
    if n == 1 and len(outputs[0][1]) == 3:
        layout = _one_output(outputs[0][1], nc, end2end)
    elif n == 2 and all(len(shape) == 3 for _, shape in outputs):
        layout = _two_outputs(outputs, nc, values)
    elif n in (3, 4):
        layout = "nms4" if _fits("nms4", outputs, nc) is not False else False
    else:
        layout = False
    if layout is False:
        raise LayoutError(nothing_fits(outputs, nc))
    return layout


def detect_batch(declared: list[Output], values: list[np.ndarray], nc: int | None, end2end: bool = False,
                 override: str | None = None) -> str:
    """The layout told by one batch's real outputs (`declared`: the model's, for their names)."""
    outputs = [(declared[i][0] if i < len(declared) else f"output{i}", tuple(v.shape)) for i, v in enumerate(values)]
    layout = detect(outputs, nc, end2end, override, values)
    if layout is None:
        raise LayoutError(nothing_fits(outputs, nc))
    return layout


def nothing_fits(outputs: list[Output], nc: int | None) -> str:
    return (f"the model's outputs {describe(outputs)} fit no layout bulkdet knows "
            f"(tried {', '.join(f'{name} {_EXPECTED[name]}' for name in LAYOUTS)})"
            + (f" for {nc} classes" if nc else "")
            + ": if the model has one of these, name it with --layout NAME"
            + ("" if nc else " or give its class names with --names") + " (see docs/models.md)")


_EXPECTED = {
    "yolov8": "[B, 4+nc, N]", "yolov5": "[B, N, 5+nc]", "end2end": "[B, K, 6]",
    "detr": "[B, Q, 4+nc] or [B, Q, 4] + [B, Q, nc]",
    "boxes-scores": "[B, N, 4] + [B, N, nc] or [B, nc, N]",
    "nms4": "[B, 1] + [B, K, 4] + [B, K] + [B, K] (or labels + boxes + scores)",
}


def _one_output(shape: tuple, nc: int | None, end2end: bool):
    """yolov8, yolov5, end2end or detr by the shape; None: a dimension that tells is dynamic."""
    _, a, b = shape
    if end2end and b == 6:
        return "end2end"
    if a is None or b is None:  # [B, 84, N] with N dynamic is still YOLOv8's
        return "yolov8" if nc and a == 4 + nc else None
    if nc:
        if a == 4 + nc:
            return "yolov8"
        if b == 6 and a <= 1000:  # end-to-end heads keep a few hundred boxes
            return "end2end"
        if b == 5 + nc:
            return "yolov5"
        if b == 4 + nc:
            return "detr"
        if b == 6:
            return "end2end"
        return False
    if b == 6 and a <= 1000:
        return "end2end"
    fits = [layout for layout, fit in (("yolov8", a > 4), ("yolov5", b > 5)) if fit]  # at least one class
    if not fits:
        return False
    if len(fits) == 1:  # e.g. [B, 7, 3]: 3 classes of 3 boxes, never 2 values per box
        return fits[0]
    return "yolov8" if a < b else "yolov5"  # boxes outnumber the values per box


def _two_outputs(outputs: list[Output], nc: int | None, values):
    roles = box_score_roles(outputs, nc)
    if roles is None:
        return None
    if roles is False:
        return False
    names = " ".join(name.lower() for name, _ in outputs)
    if any(hint in names for hint in DETR_NAME_HINTS):
        return "detr"
    if values is None:
        return None  # told by the box values: at the first batch
    boxes = values[roles[0]]
    lo, hi = DETR_BOX_RANGE
    finite = boxes[np.isfinite(boxes)]
    return "detr" if finite.size and lo <= finite.min() and finite.max() <= hi else "boxes-scores"


def box_score_roles(outputs: list[Output], nc: int | None):
    """(index of the boxes output, index of the scores output, classes_first): classes_first when
    the scores are [B, nc, N] (PaddleDetection's PP-YOLOE) rather than [B, N, nc]. None: a dynamic
    dimension hides it; False: no [B, N, 4] + scores pair.

    The scores' dimension that equals the boxes' N is the boxes one; when N is hidden (dynamic),
    the one equal to the class count (`nc`, from the names) is the classes one, else a fixed
    dimension facing a dynamic one is the classes one (an export fixes its class count). Scores
    [B, N, N] (as many classes as boxes) read as [B, N, nc]."""
    (_, s0), (_, s1) = outputs
    if len(s0) != 3 or len(s1) != 3:
        return False
    four = [i for i, (_, s) in enumerate(outputs) if s[2] == 4]
    if len(four) == 2:  # nc == 4: the name tells
        named = [i for i, (name, _) in enumerate(outputs) if "box" in name.lower()]
        four = named if len(named) == 1 else four[:1]
    if len(four) != 1:
        return None if any(s[2] is None for s in (s0, s1)) else False
    boxes = four[0]
    scores = 1 - boxes
    n = outputs[boxes][1][1]
    first = _classes_first(n, outputs[scores][1][1:], nc)
    if first is None or first is False:
        return first
    c = outputs[scores][1][1 if first == "classes" else 2]
    if c is not None and (c < 1 or (nc and c != nc)):
        return False
    return (boxes, scores, first == "classes")


def _classes_first(n: int | None, dims: tuple, nc: int | None):
    """Which of the scores' two dimensions `dims` is the classes one: "classes" (first: [nc, N]),
    "boxes" (first: [N, nc]); None when a dynamic dimension hides it; False when neither fits."""
    a, b = dims

    def fits(boxes_dim, classes_dim):  # None: can't tell
        if n is not None and boxes_dim is not None and boxes_dim != n:
            return False
        if nc and classes_dim is not None and classes_dim != nc:
            return False
        return True

    boxes_first, classes_first = fits(a, b), fits(b, a)
    if boxes_first != classes_first:
        return "boxes" if boxes_first else "classes"
    if not boxes_first:
        return False
    # Both fit: decided by what is known, most telling first.
    if a is not None and a == b:  # [B, N, N]: as many classes as boxes
        return "boxes"
    if n is not None and n in (a, b):
        return "boxes" if a == n else "classes"
    if nc and nc in (a, b):
        return "boxes" if b == nc else "classes"
    if (a is None) != (b is None):  # a fixed class count facing a dynamic number of boxes
        return "boxes" if a is None else "classes"
    return None


def nms4_roles(outputs: list[Output]) -> tuple[int | None, int, int, int] | None:
    """Indices of (num_dets, boxes, scores, classes) by name, else by rank (declared order for the two
    [B, K] outputs: scores first, as EfficientNMS); None when they can't be told. Three outputs
    (RT-DETR / D-FINE exported with their post-processor: labels, boxes, scores) have no num_dets
    (None: every row counts) and are told by name only."""
    keys = (("num",), ("box",), ("score", "conf"), ("class", "label", "cls"))
    by_name = []
    for words in keys:
        hits = [i for i, (name, _) in enumerate(outputs) if any(w in name.lower() for w in words)]
        by_name.append(hits[0] if len(hits) == 1 else None)
    if len(outputs) == 3:
        roles = by_name[1:]
        ok = None not in roles and len(set(roles)) == 3 and len(outputs[roles[0]][1]) == 3 \
            and all(len(outputs[i][1]) == 2 for i in roles[1:])
        return (None, *roles) if ok else None
    if None not in by_name and len(set(by_name)) == 4:
        return tuple(by_name)
    boxes = [i for i, (_, s) in enumerate(outputs) if len(s) == 3]
    num = [i for i, (_, s) in enumerate(outputs) if len(s) == 1 or (len(s) == 2 and s[1] == 1)]
    pairs = [i for i, (_, s) in enumerate(outputs) if len(s) == 2 and s[1] != 1]
    if len(boxes) != 1 or len(num) != 1 or len(pairs) != 2:
        return None
    return (num[0], boxes[0], pairs[0], pairs[1])


def class_count(outputs: list[Output], layout: str | None) -> int | None:
    """How many classes a model with these outputs in `layout` has (None: its shapes don't say)."""
    shapes = [tuple(shape) for _, shape in outputs]
    if len(shapes) == 2 and all(len(shape) == 3 for shape in shapes):  # detr / boxes-scores: the scores' last dim
        roles = box_score_roles(outputs, None)
        return shapes[roles[1]][1 if roles[2] else 2] if roles else None
    if len(shapes) != 1 or len(shapes[0]) != 3:
        return None  # end2end, nms4: the class ids are values, not a dimension
    _, a, b = shapes[0]
    dim, extra = {"yolov8": (a, 4), "yolov5": (b, 5), "detr": (b, 4)}.get(layout, (None, 0))
    return dim - extra if dim else None


def _fits(layout: str, outputs: list[Output], nc: int | None):
    """Do the shapes fit `layout`? True, False, or None (a dynamic dimension hides it)."""
    shapes = [shape for _, shape in outputs]
    if layout == "nms4":
        roles = nms4_roles(outputs)
        if len(outputs) not in (3, 4) or roles is None or shapes[roles[1]][-1] not in (4, None):
            return False
        return True
    if layout in ("boxes-scores", "detr") and len(outputs) == 2:
        roles = box_score_roles(outputs, nc)
        return None if roles is None else bool(roles)
    if len(outputs) != 1 or len(shapes[0]) != 3:
        return False
    _, a, b = shapes[0]
    need = {"yolov8": (a, 4), "yolov5": (b, 5), "detr": (b, 4), "end2end": (b, None)}.get(layout)
    if need is None:
        return False
    dim, extra = need
    if dim is None:
        return None
    if extra is None:
        return dim == 6
    return dim == extra + nc if nc else dim > extra


def decode(layout: str, outputs: list[np.ndarray], input_hw: tuple[int, int],
           names: list[str] | None = None) -> Candidates:
    """One batch of a model's outputs (in the model's order; `names` its output names) as candidates."""
    specs = [(names[i] if names else f"output{i}", tuple(o.shape)) for i, o in enumerate(outputs)]
    if layout == "nms4":
        num, boxes, scores, classes = (None if i is None else outputs[i] for i in nms4_roles(specs))
        valid = None if num is None else np.asarray(num).reshape(len(boxes), -1)[:, 0].astype(np.int64)
        return Candidates(_f32(boxes), _f32(scores), np.asarray(classes).astype(np.int64), valid, False)
    if len(outputs) == 2:
        roles = box_score_roles(specs, None)
        if not roles:
            raise LayoutError(f"the model's outputs {describe(specs)} do not fit layout {layout}")
        boxes, scores = _f32(outputs[roles[0]]), _f32(outputs[roles[1]])
        if roles[2]:  # [B, nc, N] (PaddleDetection): as [B, N, nc]
            scores = np.ascontiguousarray(scores.transpose(0, 2, 1))
        b, n, nc = scores.shape
        if layout == "boxes-scores":  # every (box, class) pair above --conf, NMS per class (multiclass NMS)
            return Candidates(boxes, scores.reshape(b, n * nc), None, None, True, per_box=nc)
        if layout != "detr":
            raise LayoutError(f"layout {layout} has one output, the model has {describe(specs)}")
        if scores.size and (scores.min() < 0 or scores.max() > 1):  # logits
            scores = 1 / (1 + np.exp(-scores))
        # Every (query, class) pair is a candidate (D-FINE, RF-DETR): the top ones are kept downstream.
        return Candidates(_xyxy(boxes * _scale(input_hw)), scores.reshape(b, n * nc), None, None, False, per_box=nc)
    if len(outputs) != 1:
        raise LayoutError(f"layout {layout} has one output, the model has {describe(specs)}")
    output = _f32(outputs[0])
    if layout == "yolov8":  # [B, 4+nc, N]: cx, cy, w, h, class scores
        pred = output.transpose(0, 2, 1)
        return _best_class(_xyxy(pred[..., :4]), pred[..., 4:], True)
    if layout == "yolov5":  # [B, N, 5+nc]: cx, cy, w, h, objectness, class scores
        objectness, cls = output[..., 4:5], output[..., 5:]
        if objectness.size and objectness.min() >= 0:  # (sigmoid outputs) the best product is at the best
            return _best_class(_xyxy(output[..., :4]), cls, True, weight=objectness[..., 0])  # class: no product
        return _best_class(_xyxy(output[..., :4]), cls * objectness, True)
    if layout == "detr":  # [B, Q, 4+nc]: normalised cx, cy, w, h, class probabilities
        return _best_class(_xyxy(output[..., :4] * _scale(input_hw)), output[..., 4:], False)
    if layout == "end2end":  # [B, K, 6]: x1, y1, x2, y2, score, class
        return Candidates(output[..., :4], output[..., 4], output[..., 5].astype(np.int64), None, False)
    raise LayoutError(f"layout {layout} needs {_EXPECTED[layout]}, the model has {describe(specs)}")


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _scale(input_hw) -> np.ndarray:
    h, w = input_hw
    return np.array([w, h, w, h], np.float32)


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], axis=-1)


def _best_class(boxes: np.ndarray, cls_scores: np.ndarray, needs_nms: bool,
                weight: np.ndarray | None = None) -> Candidates:
    """Each box's best class of `cls_scores` [B, N, nc] (a view will do), its score times `weight`
    [B, N] (objectness, >= 0) if given. The class itself is found only for the candidates kept."""
    scores = cls_scores.max(-1)
    return Candidates(boxes, scores if weight is None else weight * scores, None, None, needs_nms,
                      class_scores=cls_scores.transpose(0, 2, 1))
