"""Raw model output -> final boxes per image in upright original pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bulkdet.choices import MAX_DET
from bulkdet.model.info import detect_layout
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


def non_finite(output: np.ndarray) -> str | None:
    """Why one image's raw output is unusable (inf/NaN values), or None when it is finite."""
    if np.isfinite(output).all():
        return None
    nan, inf = int(np.isnan(output).sum()), int(np.isinf(output).sum())
    return (f"the model's output holds {nan} NaN and {inf} inf value(s) for this image: no detections kept "
            f"(a broken model or a precision overflow; compare with --precision fp32)")


def split_candidates(output: np.ndarray, layout: str):
    """Per-image (boxes xyxy in input pixels, best score, best class) for each layout."""
    if layout == "yolov8":  # [B, 4+nc, N]: cx, cy, w, h, class scores
        pred = output.transpose(0, 2, 1)
        xywh, cls_scores = pred[..., :4], pred[..., 4:]
    elif layout == "yolov5":  # [B, N, 5+nc]: cx, cy, w, h, objectness, class scores
        xywh, cls_scores = output[..., :4], output[..., 5:] * output[..., 4:5]
    else:  # end2end [B, K, 6]: x1, y1, x2, y2, score, class
        return output[..., :4], output[..., 4], output[..., 5].astype(np.int64)
    boxes = np.concatenate([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], axis=-1)
    class_ids = cls_scores.argmax(-1)
    scores = np.take_along_axis(cls_scores, class_ids[..., None], -1)[..., 0]
    return boxes, scores, class_ids


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


def postprocess(output: np.ndarray, batch: Batch, nc: int | None, conf: float, iou: float,
                max_det: int, end2end: bool = False) -> list[Detections]:
    output = np.asarray(output, dtype=np.float32)
    layout = detect_layout(output.shape, nc, end2end)
    boxes, scores, class_ids = split_candidates(output, layout)
    scale_x, scale_y = batch.letterbox.scale(batch.width, batch.height)
    results = []
    for i in range(len(batch)):
        if error := non_finite(output[i]):
            results.append(Detections.refused(error))
            continue
        keep = np.flatnonzero(scores[i] > conf)
        if keep.size > MAX_NMS_CANDIDATES:
            keep = keep[np.argsort(scores[i][keep])[::-1][:MAX_NMS_CANDIDATES]]
        b, s, c = boxes[i][keep], scores[i][keep], class_ids[i][keep]
        if layout != "end2end" and len(s):
            kept = nms(b + (c * _CLASS_OFFSET)[:, None], s, iou)
            b, s, c = b[kept], s[kept], c[kept]
        order = np.argsort(-s, kind="stable")[:max_det]
        b, s, c = b[order], s[order], c[order]
        # Input pixels -> upright original pixels: undo the padding, then the resize.
        b = (b - [batch.letterbox.left[i], batch.letterbox.top[i]] * 2) / ([scale_x[i], scale_y[i]] * 2)
        b = np.clip(b, 0, [batch.width[i], batch.height[i]] * 2)
        results.append(Detections(b.astype(np.float32), s.astype(np.float32), c.astype(np.int16)))
    return results
