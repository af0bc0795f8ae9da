"""The baseline (e): detection over a folder as a typical user writes it.

PIL opens each file, letterboxes it to a 640x640 square, ONNX Runtime runs it at batch 1
with default session options, numpy does the NMS, and one Parquet file is written at the
end. No batching, no overlap, no shards: the script people start from. With `gpu`, the same
script with ONNX Runtime's CUDA provider (what such a user does on a GPU machine).

    python -m benchmarks.naive IMAGE_DIR MODEL.onnx OUT.parquet [cpu|gpu]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SIZE, CONF, IOU = 640, 0.25, 0.45


def letterbox(img: Image.Image):
    w, h = img.size
    r = SIZE / max(w, h)
    nw, nh = round(w * r), round(h * r)
    canvas = Image.new("RGB", (SIZE, SIZE), (114, 114, 114))
    left, top = (SIZE - nw) // 2, (SIZE - nh) // 2
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
    return canvas, r, left, top


def nms(boxes, scores, iou):
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0, xx2 - xx1) * np.maximum(0, yy2 - yy1)
        area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
        areas = (boxes[order[1:], 2] - boxes[order[1:], 0]) * (boxes[order[1:], 3] - boxes[order[1:], 1])
        order = order[1:][inter / (area_i + areas - inter + 1e-9) <= iou]
    return keep


def open_session(model: str, device: str = "cpu") -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    if device == "gpu":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(model), providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"ONNX Runtime did not start {providers[0]}: it runs on {session.get_providers()}")
    return session


def detect(session: ort.InferenceSession, path: Path) -> list[dict]:
    """One image: open, letterbox, infer at batch 1, NMS; its detections as rows."""
    img = Image.open(path).convert("RGB")
    canvas, r, left, top = letterbox(img)
    x = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
    pred = session.run(None, {session.get_inputs()[0].name: x})[0][0].T  # [N, 4 + nc]
    scores = pred[:, 4:].max(1)
    classes = pred[:, 4:].argmax(1)
    mask = scores > CONF
    xywh, scores, classes = pred[mask, :4], scores[mask], classes[mask]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    rows = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        for k in nms(boxes[idx], scores[idx], IOU):
            x1, y1, x2, y2 = boxes[idx[k]]
            rows.append({"path": path.name, "class_id": int(c), "score": float(scores[idx[k]]),
                         "x1": (x1 - left) / r, "y1": (y1 - top) / r,
                         "x2": (x2 - left) / r, "y2": (y2 - top) / r})
    return rows


def main(image_dir: str, model: str, out: str, device: str = "cpu") -> None:
    session = open_session(model, device)
    rows = [row for path in sorted(Path(image_dir).glob("*.jpg")) for row in detect(session, path)]
    pq.write_table(pa.Table.from_pylist(rows), out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
