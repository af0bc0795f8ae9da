"""Each layout's decoding (model/layouts.py + run/postprocess.py) against an independent numpy
re-implementation of its reference predictor's post-processing, on the same random tensors:

- yolov8 / yolov5: Ultralytics `non_max_suppression` (multi_label=False: each box's best class,
  conf filter, class-offset NMS, max_det; YOLOv5's score is objectness x class)
- detr (one output): Ultralytics `RTDETRPredictor.postprocess` (each query's best class above conf)
- detr (two outputs): D-FINE / RF-DETR `PostProcessor` (sigmoid, top-k over query x class)
- boxes-scores: YOLO-NAS `PPYoloEPostPredictionCallback` (multi_label_per_box) / PP-YOLOE
  `multiclass_nms`: every (box, class) pair above conf, NMS per class
- nms4: EfficientNMS (rows past num_dets are padding)

The references use their own IoU and NMS (not bulkdet's), and no code of bulkdet's layouts.
"""

import numpy as np
import pytest

from bulkdet.run.plan import Batch, letterbox
from bulkdet.run.postprocess import postprocess

CONF, IOU, MAX_DET = 0.3, 0.5, 300
SIZE = 320  # model input, square; originals of the same size: no letterbox in the way


def square_batch(n=1):
    wh = np.full(n, SIZE, np.int32)
    return Batch(0, 0, np.arange(n), [str(i) for i in range(n)], [b""] * n, wh, wh, (SIZE, SIZE),
                 letterbox(wh, wh, SIZE, SIZE))


# ------------------------------------------------------------------ the references (numpy)

def ref_xyxy(xywh):
    x, y, w, h = np.moveaxis(xywh, -1, 0)
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], -1)


def ref_iou(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def ref_nms(boxes, scores, iou):
    """torchvision.ops.nms: highest score first, drop boxes with IoU > iou."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if ref_iou(boxes[i], boxes[[j]])[0] <= iou]
    return np.array(keep, np.int64)


def ref_batched_nms(boxes, scores, labels, iou):
    """torchvision.ops.batched_nms: NMS within each class, merged by score."""
    keep = np.concatenate([np.flatnonzero(labels == c)[ref_nms(boxes[labels == c], scores[labels == c], iou)]
                           for c in np.unique(labels)] or [np.zeros(0, np.int64)])
    return keep[np.argsort(-scores[keep], kind="stable")]


def rows(boxes, scores, labels):
    return np.concatenate([boxes, scores[:, None], labels[:, None]], 1)


def ref_ultralytics_nms(pred, v5=False):
    """ultralytics.utils.ops.non_max_suppression, multi_label=False, one image: pred [4+nc, N] (v8)
    or [N, 5+nc] (v5, scores = obj * cls after an objectness prefilter)."""
    if v5:
        pred = pred[pred[:, 4] > CONF]
        box, cls_scores = pred[:, :4], pred[:, 5:] * pred[:, 4:5]
    else:
        box, cls_scores = pred[:4].T, pred[4:].T
    conf, j = cls_scores.max(1), cls_scores.argmax(1)
    keep = conf > CONF
    box, conf, j = ref_xyxy(box[keep]), conf[keep], j[keep]
    kept = ref_batched_nms(box, conf, j, IOU)[:MAX_DET]
    return rows(box[kept], conf[kept], j[kept])


def ref_rtdetr_predictor(pred):
    """ultralytics RTDETRPredictor.postprocess, one image: pred [Q, 4+nc], boxes normalised."""
    score, cls = pred[:, 4:].max(-1), pred[:, 4:].argmax(-1)
    keep = score > CONF
    return rows(ref_xyxy(pred[keep, :4]) * SIZE, score[keep], cls[keep])


def ref_dfine_postprocessor(boxes, logits, num_top_queries=MAX_DET):
    """D-FINE / RF-DETR PostProcessor (use_focal_loss): sigmoid, top-k over query x class, then
    the deployment's score threshold. Boxes cx, cy, w, h normalised, scaled by orig_target_sizes."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    flat = scores.reshape(-1)
    top = np.argsort(-flat, kind="stable")[:num_top_queries]
    labels, index = top % scores.shape[1], top // scores.shape[1]
    out = rows(ref_xyxy(boxes[index]) * SIZE, flat[top], labels)
    return out[out[:, 4] > CONF]


def ref_multiclass_nms(boxes, scores):
    """YOLO-NAS PPYoloEPostPredictionCallback(multi_label_per_box=True) / PP-YOLOE multiclass_nms:
    every (box, class) above the threshold, NMS per class, the best max_predictions."""
    i, j = np.nonzero(scores > CONF)
    b, s = boxes[i], scores[i, j]
    kept = ref_batched_nms(b, s, j, IOU)[:MAX_DET]
    return rows(b[kept], s[kept], j[kept])


def ref_efficient_nms(num, boxes, scores, classes):
    n = int(num.reshape(-1)[0])
    return rows(boxes[:n], scores[:n], classes[:n])


# ------------------------------------------------------------------ the comparisons

def bulkdet_rows(outputs, layout, names=None, max_det=MAX_DET):
    det = postprocess([np.asarray(o) for o in outputs], square_batch(), layout, CONF, IOU, max_det, names)[0]
    return rows(det.boxes, det.scores, det.class_ids.astype(np.float32))


def same(ours, ref, at_least=5):
    """The same detections, in any order: boxes within 1e-3 px, scores within 1e-5, same classes."""
    ours, ref = (a[np.lexsort((a[:, 1], a[:, 0], a[:, 5]))] for a in (np.asarray(ours, np.float64),
                                                                      np.asarray(ref, np.float64)))
    assert len(ours) == len(ref) and len(ref) >= at_least, (len(ours), len(ref))
    np.testing.assert_array_equal(ours[:, 5], ref[:, 5])
    np.testing.assert_allclose(ours[:, 4], ref[:, 4], atol=1e-5)
    np.testing.assert_allclose(ours[:, :4], ref[:, :4], atol=1e-3)


def random_xywh(rng, n):
    """Boxes of 10..80 px inside the input, overlapping enough for NMS to matter."""
    return np.concatenate([rng.uniform(40, SIZE - 40, (n, 2)), rng.uniform(10, 80, (n, 2))], 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_yolov8_matches_ultralytics_nms(seed):
    rng = np.random.default_rng(seed)
    pred = np.concatenate([random_xywh(rng, 600).T, rng.uniform(0, 0.6, (5, 600))]).astype(np.float32)
    same(bulkdet_rows([pred[None]], "yolov8"), ref_ultralytics_nms(pred))


@pytest.mark.parametrize("low", [0.0, -0.3])  # sigmoid objectness (the class found after the threshold), or not
def test_yolov5_matches_ultralytics_nms_with_objectness(low):
    rng = np.random.default_rng(2)
    pred = np.concatenate([random_xywh(rng, 600), rng.uniform(low, 1, (600, 1)), rng.uniform(0, 0.8, (600, 4))],
                          1).astype(np.float32)
    same(bulkdet_rows([pred[None]], "yolov5"), ref_ultralytics_nms(pred, v5=True))


def test_detr_one_output_matches_ultralytics_rtdetr_predictor():
    rng = np.random.default_rng(3)
    pred = np.concatenate([random_xywh(rng, 300) / SIZE, rng.uniform(0, 0.5, (300, 4))], 1).astype(np.float32)
    same(bulkdet_rows([pred[None]], "detr"), ref_rtdetr_predictor(pred))


@pytest.mark.parametrize("order", ["boxes-logits", "logits-boxes"])
def test_detr_two_outputs_match_dfine_topk_over_sigmoid(order):
    rng = np.random.default_rng(4)
    boxes = random_xywh(rng, 300) / SIZE
    logits = rng.normal(-1, 1.5, (300, 6)).astype(np.float32)
    ref = ref_dfine_postprocessor(boxes, logits)
    assert len(ref) > 100 and (1 / (1 + np.exp(-logits)) > CONF).sum() > MAX_DET  # the top-k decides
    outputs, names = [boxes[None], logits[None]], ["pred_boxes", "pred_logits"]
    if order == "logits-boxes":
        outputs, names = outputs[::-1], names[::-1]
    same(bulkdet_rows(outputs, "detr", names), ref)


def test_boxes_scores_match_multiclass_nms_with_several_classes_per_box():
    rng = np.random.default_rng(5)
    boxes = ref_xyxy(random_xywh(rng, 500)).astype(np.float32)
    scores = rng.uniform(0, 0.6, (500, 5)).astype(np.float32)
    assert ((scores > CONF).sum(1) > 1).sum() > 50  # many boxes have two classes above conf: both count
    same(bulkdet_rows([boxes[None], scores[None]], "boxes-scores", ["boxes", "scores"]), ref_multiclass_nms(boxes, scores))
    same(bulkdet_rows([scores[None], boxes[None]], "boxes-scores", ["scores", "boxes"]), ref_multiclass_nms(boxes, scores))


def test_nms4_matches_efficient_nms_count():
    rng = np.random.default_rng(6)
    boxes = ref_xyxy(random_xywh(rng, 100)).astype(np.float32)
    scores = np.sort(rng.uniform(0.35, 0.95, 100))[::-1].astype(np.float32)
    classes = rng.integers(0, 3, 100).astype(np.int32)
    num = np.array([[37]], np.int32)
    outputs = [num, boxes[None], scores[None], classes[None]]
    same(bulkdet_rows(outputs, "nms4", ["num_dets", "det_boxes", "det_scores", "det_classes"]),
         ref_efficient_nms(num, boxes, scores, classes))


def ref_scale_boxes(boxes, img0_hw, img1_hw):
    """ultralytics.utils.ops.scale_boxes: from the letterboxed input back to the original image."""
    gain = min(img1_hw[0] / img0_hw[0], img1_hw[1] / img0_hw[1])
    pad_x = round((img1_hw[1] - img0_hw[1] * gain) / 2 - 0.1)
    pad_y = round((img1_hw[0] - img0_hw[0] * gain) / 2 - 0.1)
    out = (boxes - [pad_x, pad_y, pad_x, pad_y]) / gain
    return np.clip(out, 0, [img0_hw[1], img0_hw[0]] * 2)


@pytest.mark.parametrize("w,h", [(640, 480), (1500, 200), (333, 500), (4000, 3000)])
def test_unletterbox_matches_ultralytics_scale_boxes_within_a_pixel(w, h):
    """bulkdet maps boxes back through the exact (rounded) resize it made; Ultralytics through the
    unrounded gain: they agree to well under a pixel of the original (docs/models.md)."""
    rng = np.random.default_rng(7)
    width, height = np.array([w], np.int32), np.array([h], np.int32)
    lb = letterbox(width, height, 640, 640)
    batch = Batch(0, 0, np.arange(1), ["a"], [b""], width, height, (640, 640), lb)
    x1 = rng.uniform(lb.left[0], lb.left[0] + lb.new_w[0] - 20, 50)
    y1 = rng.uniform(lb.top[0], lb.top[0] + lb.new_h[0] - 20, 50)
    xyxy = np.stack([x1, y1, x1 + 15, y1 + 15], 1).astype(np.float32)
    pred = np.concatenate([xyxy, np.full((50, 1), 0.9), np.zeros((50, 1))], 1).astype(np.float32)[None]
    det = postprocess([pred], batch, "end2end", CONF, IOU, MAX_DET)[0]
    ref = ref_scale_boxes(xyxy.astype(np.float64), (h, w), (640, 640))
    order = np.lexsort((det.boxes[:, 1], det.boxes[:, 0]))
    ref_order = np.lexsort((ref[:, 1], ref[:, 0]))
    assert len(det) == 50
    err = np.abs(det.boxes[order] - ref[ref_order]).max()
    assert err <= max(w / lb.new_w[0], h / lb.new_h[0]), err  # under one input pixel, in original pixels


def test_rtdetr_with_its_postprocessor_is_nms4_without_a_count():
    """RT-DETR / D-FINE exported with their post-processor (orig_target_sizes input): labels, boxes,
    scores, every row counts; bulkdet keeps those above --conf as the deployment scripts do."""
    from bulkdet.model.layouts import LayoutError, detect

    rng = np.random.default_rng(8)
    labels = rng.integers(0, 80, (1, 300)).astype(np.int64)
    boxes = ref_xyxy(random_xywh(rng, 300))[None].astype(np.float32)
    scores = rng.uniform(0, 1, (1, 300)).astype(np.float32)
    names = ["labels", "boxes", "scores"]
    assert detect([(n, o.shape) for n, o in zip(names, (labels, boxes, scores))], 80) == "nms4"
    with pytest.raises(LayoutError):  # three outputs are told by their names only
        detect([("a", (1, 300)), ("b", (1, 300, 4)), ("c", (1, 300))], 80)
    keep = scores[0] > CONF
    same(bulkdet_rows([labels, boxes, scores], "nms4", names), rows(boxes[0][keep], scores[0][keep], labels[0][keep]))
