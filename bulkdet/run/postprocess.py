"""Raw model output -> final boxes per image in upright original pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bulkdet.choices import MAX_DET
from bulkdet.model.layouts import decode
from bulkdet.run.plan import Batch

MAX_NMS_CANDIDATES = MAX_DET  # cap before NMS, as the reference YOLO predictors do
_CLASS_OFFSET = 1e5  # shifts boxes per class so one NMS pass never mixes classes


INFER_ERROR = "infer_error"  # status of an image whose model output is unusable (see Detections.error)


@dataclass
class Detections:
    """Detections of one image: boxes [n,4] x1,y1,x2,y2, scores [n], class ids [n].

    `error` is set (and there are no detections) when the model's output for the image held
    inf or NaN: such numbers are no detections, and rows with score=inf or x1=nan would mislead.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    error: str | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def refused(cls, error: str) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16), error)


def non_finite(*outputs: np.ndarray) -> str | None:
    """Why one image's raw outputs are unusable (inf/NaN values), or None when they are finite."""
    floats = [o for o in outputs if np.issubdtype(o.dtype, np.floating)]
    if all(np.isfinite(o).all() for o in floats):
        return None
    nan, inf = sum(int(np.isnan(o).sum()) for o in floats), sum(int(np.isinf(o).sum()) for o in floats)
    return (f"the model's output holds {nan} NaN and {inf} inf value(s) for this image: no detections kept "
            f"(a broken model or a precision overflow; compare with --precision fp32)")


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS; returns kept indices in descending score order."""
    order = scores.argsort()[::-1]
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(outputs: list[np.ndarray], batch: Batch, layout: str, conf: float, iou: float,
                max_det: int, output_names: list[str] | None = None,
                classes: list[int] | None = None) -> list[Detections]:
    """All of one batch's model outputs (batch-major, padding rows already dropped) in `layout`
    (model/layouts.py) -> detections per image in upright original pixels. `classes`: keep only
    these class ids (`run --classes`), chosen before NMS and the top-k so other classes take no place."""
    cand = decode(layout, outputs, batch.input_hw, output_names)
    scores = cand.scores
    scale_x, scale_y = batch.letterbox.scale(batch.width, batch.height)
    results = []
    for i in range(len(batch)):
        if error := non_finite(*(np.asarray(o[i]) for o in outputs)):
            results.append(Detections.refused(error))
            continue
        rows = scores[i] if cand.valid is None else scores[i][:max(int(cand.valid[i]), 0)]
        keep = np.flatnonzero(rows > conf)
        if classes is not None:
            keep = keep[np.isin(cand.classes_of(i, keep), classes)]
        if keep.size > MAX_NMS_CANDIDATES:
            keep = keep[np.argsort(scores[i][keep])[::-1][:MAX_NMS_CANDIDATES]]
        b, s, c = cand.take(i, keep)
        if cand.needs_nms and len(s):
            kept = nms(b + (c * _CLASS_OFFSET)[:, None], s, iou)
            b, s, c = b[kept], s[kept], c[kept]
        order = np.argsort(-s, kind="stable")[:max_det]
        b, s, c = b[order], s[order], c[order]
        # Input pixels -> upright original pixels: undo the padding, then the resize.
        b = (b - [batch.letterbox.left[i], batch.letterbox.top[i]] * 2) / ([scale_x[i], scale_y[i]] * 2)
        b = np.clip(b, 0, [batch.width[i], batch.height[i]] * 2)
        results.append(Detections(b.astype(np.float32), s.astype(np.float32), c.astype(np.int16)))
    return results
