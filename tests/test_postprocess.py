import numpy as np
import pytest

from bulkdet.model.info import parse_names
from bulkdet.model.layouts import detect
from bulkdet.run.plan import Batch, letterbox
from bulkdet.run.postprocess import nms, postprocess


def batch_of(sizes, input_hw=(640, 640)):
    w = np.array([s[0] for s in sizes], np.int32)
    h = np.array([s[1] for s in sizes], np.int32)
    n = len(sizes)
    return Batch(0, 0, np.arange(n), [f"{i}" for i in range(n)], [b""] * n, w, h, input_hw,
                 letterbox(w, h, *input_hw))


def test_letterbox_geometry_centres_and_keeps_aspect():
    lb = letterbox(np.array([1280, 480]), np.array([720, 640]), 640, 640)
    assert lb.new_w.tolist() == [640, 480] and lb.new_h.tolist() == [360, 640]
    assert lb.left.tolist() == [0, 80] and lb.top.tolist() == [140, 0]


@pytest.mark.parametrize("shape,nc,layout", [
    ((1, 84, 8400), 80, "yolov8"), ((1, 25200, 85), 80, "yolov5"), ((1, 300, 6), 80, "end2end"),
    ((2, 7, 3), 3, "yolov8"), ((1, 84, 8400), None, "yolov8"), ((1, 25200, 85), None, "yolov5"),
    ((1, 300, 6), None, "end2end"), ((1, 6300, 6), 1, "yolov5"),
])
def test_detect_layout(shape, nc, layout):
    assert detect([("output0", shape)], nc) == layout


def test_parse_names_formats():
    assert parse_names("{0: 'person', 1: 'car'}") == {0: "person", 1: "car"}
    assert parse_names('["a", "b"]') == {0: "a", 1: "b"}
    assert parse_names("cat\ndog\n") == {0: "cat", 1: "dog"}


def test_nms_suppresses_overlap_keeps_separate():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keep = nms(boxes, np.array([0.9, 0.8, 0.7]), iou=0.45)
    assert keep.tolist() == [0, 2]


def yolov8_output(boxes_xyxy, cls, scores, nc, n_anchors=10):
    out = np.zeros((1, 4 + nc, n_anchors), np.float32)
    for j, ((x1, y1, x2, y2), c, s) in enumerate(zip(boxes_xyxy, cls, scores)):
        out[0, :4, j] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        out[0, 4 + c, j] = s
    return out


def test_yolov8_classwise_nms_and_unletterbox():
    # 1280x720 image -> 640x360 at top 140: input box maps to original by x2 scale.
    out = yolov8_output([(100, 240, 200, 340), (102, 242, 202, 342), (100, 240, 200, 340)],
                        [0, 0, 1], [0.9, 0.8, 0.7], nc=2)
    dets = postprocess([out], batch_of([(1280, 720)]), "yolov8", conf=0.25, iou=0.45, max_det=300)[0]
    assert len(dets) == 2  # same-class duplicate removed, other class kept despite overlap
    assert sorted(dets.class_ids.tolist()) == [0, 1]
    np.testing.assert_allclose(dets.boxes[0], [200, 200, 400, 400], atol=1e-4)


def test_yolov5_objectness_multiplies_class_score():
    out = np.zeros((1, 4, 7), np.float32)
    out[0, 0] = [320, 320, 100, 100, 0.5, 0.9, 0.1]  # 0.45 score class 0
    out[0, 1] = [100, 100, 20, 20, 0.2, 0.9, 0.1]  # 0.18 < conf
    dets = postprocess([out], batch_of([(640, 640)]), "yolov5", conf=0.25, iou=0.45, max_det=300)[0]
    assert len(dets) == 1 and dets.scores[0] == pytest.approx(0.45)
    np.testing.assert_allclose(dets.boxes[0], [270, 270, 370, 370])


def test_end2end_no_nms_conf_filter_and_clip():
    out = np.array([[[10, 10, 50, 50, 0.9, 3], [12, 12, 52, 52, 0.8, 3], [600, 600, 700, 700, 0.5, 1],
                     [0, 0, 5, 5, 0.1, 2]]], np.float32)
    dets = postprocess([out], batch_of([(640, 640)]), "end2end", conf=0.25, iou=0.45, max_det=300)[0]
    assert len(dets) == 3  # overlapping boxes kept: the graph already did NMS
    assert dets.boxes.max() <= 640  # clipped to the image
    assert dets.class_ids.tolist() == [3, 3, 1]


def test_max_det_keeps_best():
    out = yolov8_output([(i * 20, 0, i * 20 + 10, 10) for i in range(10)], [0] * 10,
                        [0.3 + i * 0.05 for i in range(10)], nc=1)
    dets = postprocess([out], batch_of([(640, 640)]), "yolov8", conf=0.25, iou=0.45, max_det=3)[0]
    assert np.allclose(dets.scores, [0.75, 0.7, 0.65])
