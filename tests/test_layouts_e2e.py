"""Every output layout (model/layouts.py) and fixed input shapes give the exact boxes of YOLOv8's.

The analytic detector's graph (YOLOv8 layout, [B, 7, 3]) is extended with real ONNX ops into the
other layouts; its input and output dims are fixed with onnx's helpers for fixed-shape models.
"""

import json

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper

from bulkdet.choices import Layout
from bulkdet.engines.base import InputSlot, fixed_batch
from bulkdet.ingest.pack import pack
from bulkdet.model.layouts import LAYOUTS, LayoutError, box_score_roles, class_count, decode, detect
from bulkdet.synthetic import compare_with_truth
from conftest import make_images

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _const(name, values, dtype=I64):
    shape = [len(values)] if isinstance(values, list) else []
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, dtype, shape, values if isinstance(values, list) else [values]))


def _common():
    """From the analytic detector's "v8" [B, 7, 3]: rl_xywh, rl_xyxy [B, 3, 4] in input pixels,
    rl_cls [B, 3, 3] class scores, rl_best [B, 3, 1], rl_clsf [B, 3, 1] the class, rl_nxywh normalised."""
    return [
        helper.make_node("Transpose", ["v8"], ["rl_t"], perm=[0, 2, 1]),  # [B, N, 4+nc]
        _const("rl_s0", [0]), _const("rl_s2", [2]), _const("rl_s4", [4]), _const("rl_s7", [7]), _const("rl_ax", [2]),
        helper.make_node("Slice", ["rl_t", "rl_s0", "rl_s4", "rl_ax"], ["rl_xywh"]),
        helper.make_node("Slice", ["rl_t", "rl_s4", "rl_s7", "rl_ax"], ["rl_cls"]),
        helper.make_node("ReduceMax", ["rl_cls"], ["rl_best"], axes=[2], keepdims=1),
        helper.make_node("Slice", ["rl_xywh", "rl_s0", "rl_s2", "rl_ax"], ["rl_cxcy"]),
        helper.make_node("Slice", ["rl_xywh", "rl_s2", "rl_s4", "rl_ax"], ["rl_wh"]),
        _const("rl_half", 0.5, F),
        helper.make_node("Mul", ["rl_wh", "rl_half"], ["rl_hwh"]),
        helper.make_node("Sub", ["rl_cxcy", "rl_hwh"], ["rl_p1"]),
        helper.make_node("Add", ["rl_cxcy", "rl_hwh"], ["rl_p2"]),
        helper.make_node("Concat", ["rl_p1", "rl_p2"], ["rl_xyxy"], axis=2),
        helper.make_node("ArgMax", ["rl_cls"], ["rl_argmax"], axis=2, keepdims=1),
        helper.make_node("Cast", ["rl_argmax"], ["rl_clsf"], to=F),
        # The model input's W, H, W, H (Shape op): DETR boxes are relative to it.
        helper.make_node("Shape", ["images"], ["rl_in_shape"]),
        _const("rl_whwh_idx", [3, 2, 3, 2]),
        helper.make_node("Gather", ["rl_in_shape", "rl_whwh_idx"], ["rl_whwh_i"], axis=0),
        helper.make_node("Cast", ["rl_whwh_i"], ["rl_whwh"], to=F),
        helper.make_node("Div", ["rl_xywh", "rl_whwh"], ["rl_nxywh"]),
    ]


def _layout_nodes(layout):
    """(nodes, [(output name, dtype, dims after the batch)]) for each layout."""
    n = helper.make_node
    if layout == "yolov5":  # objectness = best class score; classes as they are
        return [n("Concat", ["rl_xywh", "rl_best", "rl_cls"], ["output0"], axis=2)], [("output0", F, [3, 8])]
    if layout == "end2end":  # x1, y1, x2, y2, score, class
        return [n("Concat", ["rl_xyxy", "rl_best", "rl_clsf"], ["output0"], axis=2)], [("output0", F, [3, 6])]
    if layout == "detr":  # RT-DETR as Ultralytics exports it: normalised cx, cy, w, h + probabilities
        return [n("Concat", ["rl_nxywh", "rl_cls"], ["output0"], axis=2)], [("output0", F, [3, 7])]
    if layout == "detr2":  # D-FINE / RF-DETR style: normalised boxes + class logits (inverse sigmoid)
        return [
            _const("rl_a", 0.98, F), _const("rl_b", 0.01, F), _const("rl_one", 1.0, F),
            n("Mul", ["rl_cls", "rl_a"], ["rl_pa"]),
            n("Add", ["rl_pa", "rl_b"], ["rl_p"]),  # 0 -> 0.01, 1 -> 0.99: finite logits
            n("Sub", ["rl_one", "rl_p"], ["rl_q"]),
            n("Log", ["rl_p"], ["rl_logp"]), n("Log", ["rl_q"], ["rl_logq"]),
            n("Sub", ["rl_logp", "rl_logq"], ["pred_logits"]),
            n("Identity", ["rl_nxywh"], ["pred_boxes"]),
        ], [("pred_logits", F, [3, 3]), ("pred_boxes", F, [3, 4])]
    if layout in ("boxes-scores", "scores-boxes"):  # x1, y1, x2, y2 in input pixels + class scores
        nodes = [n("Identity", ["rl_xyxy"], ["boxes"]), n("Identity", ["rl_cls"], ["scores"])]
        outs = [("boxes", F, [3, 4]), ("scores", F, [3, 3])]
        return nodes, outs if layout == "boxes-scores" else outs[::-1]
    if layout in ("paddle", "paddle-dynamic"):  # PP-YOLOE exclude_nms: boxes [B, N, 4], scores [B, nc, N];
        # N = 5 (two empty boxes added) so that it differs from nc = 3
        return [
            _const("rl_pads", [0, 0, 0, 0, 2, 0]),
            n("Pad", ["rl_xyxy", "rl_pads"], ["boxes"]),
            n("Pad", ["rl_cls", "rl_pads"], ["rl_cls5"]),
            n("Transpose", ["rl_cls5"], ["scores"], perm=[0, 2, 1]),
        ], [("boxes", F, [5, 4] if layout == "paddle" else ["n", 4]),
            ("scores", F, [3, 5] if layout == "paddle" else [3, "n"])]
    if layout == "nms4":  # EfficientNMS style: detections sorted by score, num_dets of them count
        return [
            _const("rl_k", [3]), _const("rl_ax1", [1]), _const("rl_zero", 0.0, F),
            n("Squeeze", ["rl_best", "rl_ax"], ["rl_best2"]),  # [B, 3]
            n("TopK", ["rl_best2", "rl_k"], ["det_scores", "rl_top"], axis=1),
            n("Unsqueeze", ["rl_top", "rl_ax"], ["rl_top1"]),
            n("Concat", ["rl_top1"] * 4, ["rl_top4"], axis=2),
            n("GatherElements", ["rl_xyxy", "rl_top4"], ["det_boxes"], axis=1),
            n("Squeeze", ["rl_argmax", "rl_ax"], ["rl_argmax2"]),
            n("GatherElements", ["rl_argmax2", "rl_top"], ["rl_classes64"], axis=1),
            n("Cast", ["rl_classes64"], ["det_classes"], to=TensorProto.INT32),
            n("Greater", ["det_scores", "rl_zero"], ["rl_present"]),
            n("Cast", ["rl_present"], ["rl_present_i"], to=TensorProto.INT32),
            n("ReduceSum", ["rl_present_i", "rl_ax1"], ["num_dets"], keepdims=1),  # [B, 1]
        ], [("num_dets", TensorProto.INT32, [1]), ("det_boxes", F, [3, 4]), ("det_scores", F, [3]),
            ("det_classes", TensorProto.INT32, [3])]
    if layout == "misfit":  # fits nothing: [B, 7, 3] and [B, 3]
        return [n("Identity", ["v8"], ["output0"]), n("Squeeze", ["rl_best", "rl_ax"], ["output1"])], \
            [("output0", F, [7, 3]), ("output1", F, [3])]
    if layout == "misfit-dynamic":  # [B, 7, 3] and [B, 3, 3], declared [B, ?, ?]: told at the first batch
        return [n("Identity", ["v8"], ["output0"]), n("Identity", ["rl_cls"], ["output1"])], \
            [("output0", F, ["n", "k"]), ("output1", F, ["m", "c"])]
    raise ValueError(layout)


def rewire(src, dst, layout="yolov8", batch=None, hw=None):
    """The analytic detector in `layout`; `batch` / `hw` fix the input's (and outputs') dims."""
    model = onnx.load(str(src))
    g = model.graph
    if layout != "yolov8":
        for node in g.node:
            node.output[:] = ["v8" if o == "output0" else o for o in node.output]
        nodes, outs = _layout_nodes(layout)
        g.node.extend(_common() + nodes)
        del g.output[:]
        g.output.extend(helper.make_tensor_value_info(name, dtype, ["batch", *dims]) for name, dtype, dims in outs)
    fixed = [(0, batch)] + ([(2, hw[0]), (3, hw[1])] if hw else [])
    for value in [g.input[0], *g.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, size in fixed:
            if size and (axis == 0 or value is g.input[0]):
                dims[axis].dim_value = size  # a fixed dim, as exporters write it
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


SPECS = [("a.jpg", 640, 480, "jpeg", 6), ("b.png", 300, 900, "png", 1), ("c.jpg", 1500, 200, "jpeg", 3),
         ("d.jpg", 800, 800, "jpeg", 1), ("e.png", 333, 500, "png", 1)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(dataset, truth) of 5 images and of 11 images (counts no fixed batch of 4 or 8 divides)."""
    root = tmp_path_factory.mktemp("layouts")
    sets = {}
    for n in (5, 11):
        specs = [(f"{i}{rel}", w, h, fmt, o) for i in range(n // 5 + 1) for rel, w, h, fmt, o in SPECS][:n]
        truth = make_images(root / f"src{n}", specs, seed=7)
        pack(root / f"src{n}", root / f"ds{n}", quiet=True)
        sets[n] = (root / f"ds{n}", truth)
    return sets


def _run_exact(cli, tmp_path, model, dataset, truth, *extra):
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q", *extra)
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "run" / "detections").to_pylist()
    assert compare_with_truth(truth, rows) == []
    return json.loads((tmp_path / "run" / "run.json").read_text())


@pytest.mark.parametrize("shapes", ["dynamic", "fixed"])
@pytest.mark.parametrize("layout,expected", [
    ("yolov5", "yolov5"), ("end2end", "end2end"), ("detr", "detr"), ("detr2", "detr"),
    ("boxes-scores", "boxes-scores"), ("scores-boxes", "boxes-scores"), ("nms4", "nms4"),
    ("paddle", "boxes-scores"), ("paddle-dynamic", "boxes-scores")])
def test_every_layout_gives_exact_boxes(tmp_path, analytic_model, cli, packed, layout, expected, shapes):
    fixed = {"batch": 4, "hw": (640, 640)} if shapes == "fixed" else {}
    model = rewire(analytic_model, tmp_path / f"{layout}.onnx", layout, **fixed)
    dataset, truth = packed[5]
    run = _run_exact(cli, tmp_path, model, dataset, truth)
    assert run["model"]["layout"] == expected  # told by the outputs, no flag
    if shapes == "fixed":
        assert run["plan"]["images_per_bucket"] == {"640x640": 5}  # one bucket at the fixed shape


@pytest.mark.parametrize("batch", [8, 4, 1])
def test_fixed_batch_runs_batches_of_exactly_that_size(tmp_path, analytic_model, cli, packed, batch):
    """ONNX Runtime refuses any other batch size: 11 images end in a short batch, padded."""
    model = rewire(analytic_model, tmp_path / "fixed.onnx", batch=batch)
    dataset, truth = packed[11]
    run = _run_exact(cli, tmp_path, model, dataset, truth, "--max-batch", "32")
    assert run["model"]["layout"] == "yolov8"
    sizes = pq.read_table(tmp_path / "run" / "metrics.parquet").column("batch_size").to_pylist()
    assert max(sizes) <= batch and sum(sizes) == 11


def test_fixed_batch_with_nms_in_model_and_precision_check(tmp_path, analytic_model, cli, packed):
    """The FP32 reference of --check-precision pads its short batches too."""
    model = rewire(analytic_model, tmp_path / "fixed.onnx", batch=4)
    dataset, truth = packed[5]
    run = _run_exact(cli, tmp_path, model, dataset, truth, "--nms-in-model", "--check-precision", "5",
                     "--cache-dir", tmp_path / "cache")
    assert run["model"]["layout"] == "end2end"
    check = run["precision_check"]
    assert check["matched"] == check["reference_boxes"] > 0 and check["drifting"] == 0


def test_fixed_hw_gives_one_bucket(tmp_path, analytic_model, cli, packed):
    model = rewire(analytic_model, tmp_path / "hw.onnx", hw=(640, 640))
    dataset, truth = packed[5]
    run = _run_exact(cli, tmp_path, model, dataset, truth, "--imgsz", "320")  # the model's shape wins
    assert run["plan"]["images_per_bucket"] == {"640x640": 5}


def test_layout_option_overrides_what_the_names_suggest(tmp_path, analytic_model, cli, packed):
    """Boxes in pixels under DETR-like names ("pred_boxes") read as detr unless --layout says."""
    model = rewire(analytic_model, tmp_path / "bs.onnx", "boxes-scores")
    m = onnx.load(str(model))
    for node in m.graph.node:
        node.output[:] = ["pred_boxes" if o == "boxes" else o for o in node.output]
    m.graph.output[0].name = "pred_boxes"
    onnx.save(m, str(model))
    dataset, truth = packed[5]
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "wrong", "-q")
    rows = pq.read_table(tmp_path / "wrong" / "detections").to_pylist() if r.exit_code == 0 else []
    assert compare_with_truth(truth, rows) != []  # read as normalised boxes: wrong
    run = _run_exact(cli, tmp_path, model, dataset, truth, "--layout", "boxes-scores")
    assert run["model"]["layout"] == "boxes-scores"


def _error_line(r):
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_outputs_that_fit_nothing_are_one_error_line(tmp_path, analytic_model, cli, packed):
    model = rewire(analytic_model, tmp_path / "misfit.onnx", "misfit")
    dataset, _ = packed[5]
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "output0 [?, 7, 3], output1 [?, 3]" in line and "--layout" in line
    assert all(name in line for name in LAYOUTS), line
    assert not (tmp_path / "run").exists()


def test_outputs_that_fit_nothing_at_the_first_batch_fail_the_run_in_one_line(tmp_path, analytic_model, cli, packed):
    model = rewire(analytic_model, tmp_path / "misfit.onnx", "misfit-dynamic")
    dataset, _ = packed[5]
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "output0 [2, 7, 3], output1 [2, 3, 3]" in line or "output0 [1, 7, 3], output1 [1, 3, 3]" in line, line
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["state"] == "failed" and "fit no layout" in run["error"]


def test_layout_option_that_does_not_fit_is_refused(tmp_path, analytic_model, cli, packed):
    dataset, _ = packed[5]
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "-q", "--layout", "nms4")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "'--layout'" in line and "output0 [?, 7, 3]" in line and "nms4" in line
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "-q", "--layout", "ssd")
    assert r.exit_code == 2 and "ssd" in _error_line(r)


def test_nms_in_model_refuses_other_layouts(tmp_path, analytic_model, cli, packed):
    model = rewire(analytic_model, tmp_path / "v5.onnx", "yolov5")
    dataset, _ = packed[5]
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q", "--nms-in-model",
            "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "yolov8 layout" in line and "yolov5" in line and "without --nms-in-model" in line


# Unit tests of detect() on shapes and of decode()


@pytest.mark.parametrize("outputs,nc,layout", [
    ([("output0", (1, 84, 8400))], 80, "yolov8"),
    ([("output0", (1, 25200, 85))], 80, "yolov5"),
    ([("output0", (1, 300, 6))], 80, "end2end"),
    ([("output0", (1, 300, 84))], 80, "detr"),  # RT-DETR
    ([("output0", (None, 84, None))], 80, "yolov8"),
    ([("output0", (None, None, None))], 80, None),  # told at the first batch
    ([("pred_logits", (1, 300, 80)), ("pred_boxes", (1, 300, 4))], 80, "detr"),
    ([("dets", (1, 300, 4)), ("labels", (1, 300, 91))], None, "detr"),  # RF-DETR's names
    ([("boxes", (1, 8400, 4)), ("scores", (1, 8400, 80))], 80, None),  # told by the box values
    ([("a", (1, 8400, 4)), ("b", (1, 8400, 4))], None, None),  # nc 4, no "box" name: can't tell
    ([("num_dets", (1, 1)), ("det_boxes", (1, 100, 4)), ("det_scores", (1, 100)), ("det_classes", (1, 100))],
     80, "nms4"),
    ([("o0", (1,)), ("o1", (1, 100, 4)), ("o2", (1, 100)), ("o3", (1, 100))], None, "nms4"),  # by rank
])
def test_detect_on_shapes(outputs, nc, layout):
    assert detect(outputs, nc) == layout


@pytest.mark.parametrize("outputs,nc,first", [
    ([("b", (1, 8400, 4)), ("s", (1, 80, 8400))], None, True),  # PP-YOLOE: N tells
    ([("b", (1, 8400, 4)), ("s", (1, 8400, 80))], None, False),
    ([("s", (1, 80, 8400)), ("b", (1, 8400, 4))], 80, True),  # either order
    ([("b", (None, None, 4)), ("s", (None, 80, None))], None, True),  # a fixed class count, dynamic N
    ([("b", (None, None, 4)), ("s", (None, None, 80))], None, False),
    ([("b", (None, None, 4)), ("s", (None, 80, 8400))], 80, True),  # N hidden: the names' count tells
    ([("b", (None, None, 4)), ("s", (None, 8400, 80))], 80, False),
    ([("b", (None, None, 4)), ("s", (None, 80, 8400))], None, None),  # told at the first batch
    ([("b", (1, 3, 4)), ("s", (1, 3, 3))], 3, False),  # as many classes as boxes: [B, N, nc]
    ([("b", (1, 5, 4)), ("s", (1, 4, 5))], 4, True),  # 4 classes
])
def test_scores_classes_first_told_by_shapes(outputs, nc, first):
    roles = box_score_roles(outputs, nc)
    assert (roles[2] if roles else roles) == first


def test_scores_classes_first_decode_and_count():
    outputs = [("boxes", (1, 5, 4)), ("scores", (1, 3, 5))]
    assert class_count(outputs, "boxes-scores") == 3
    boxes = np.arange(20, dtype=np.float32).reshape(1, 5, 4) * 10
    scores = np.zeros((1, 3, 5), np.float32)
    scores[0, 2, 1] = 0.9  # box 1, class 2
    cand = decode("boxes-scores", [boxes, scores], (640, 640), ["boxes", "scores"])
    k = int(cand.scores[0].argmax())
    got_boxes, got_scores, got_classes = cand.take(0, np.array([k]))
    assert got_classes.tolist() == [2] and got_scores.tolist() == [pytest.approx(0.9)]
    np.testing.assert_array_equal(got_boxes[0], boxes[0, 1])
    with pytest.raises(LayoutError, match="3 classes"):  # 3 names, 80 classes either way round
        detect([("b", (1, 8400, 4)), ("s", (1, 80, 8400))], 3)


@pytest.mark.parametrize("outputs,nc", [
    ([("output0", (1, 7, 3)), ("output1", (1, 3))], None),
    ([("output0", (1, 4, 5))], None),
    ([("output0", (1, 90, 8400))], 80),
    ([("boxes", (1, 8400, 4)), ("scores", (1, 8400, 80))], 3),  # 80 scores, 3 names
    ([("boxes", (1, 8400, 4)), ("scores", (1, 100, 80))], 80),  # not the same boxes
    ([("a", (1, 3)), ("b", (1, 3)), ("c", (1, 3))], None),
])
def test_detect_refuses_with_one_line_naming_shapes_and_layouts(outputs, nc):
    with pytest.raises(LayoutError) as exc:
        detect(outputs, nc)
    text = str(exc.value)
    assert "\n" not in text and outputs[0][0] + " [" in text and all(name in text for name in LAYOUTS)
    assert ("--names" in text) == (nc is None)


def test_detect_two_outputs_by_box_values():
    outputs = [("boxes", (1, 2, 4)), ("scores", (1, 2, 3))]
    scores = np.zeros((1, 2, 3), np.float32)
    pixels = np.array([[[10, 20, 300, 400], [0, 0, 0, 0]]], np.float32)
    assert detect(outputs, 3, values=[pixels, scores]) == "boxes-scores"
    assert detect(outputs, 3, values=[pixels / 640, scores]) == "detr"


def test_override_wins_and_is_checked():
    assert detect([("output0", (1, 300, 84))], None, override="detr") == "detr"
    with pytest.raises(LayoutError, match="do not fit --layout end2end"):
        detect([("output0", (1, 300, 84))], 80, override="end2end")
    assert [m.value for m in Layout] == list(LAYOUTS)  # the CLI's choices are the layouts


def test_decode_detr_two_outputs_takes_every_query_class_pair():
    boxes = np.array([[[0.5, 0.5, 0.5, 0.25]]], np.float32)  # one query, centre of a 640x320 input
    logits = np.array([[[3.0, 2.0, -5.0]]], np.float32)  # two classes above 0.5 after the sigmoid
    cand = decode("detr", [boxes, logits], (320, 640), ["pred_boxes", "pred_logits"])
    assert not cand.needs_nms and cand.valid is None
    assert cand.classes_of(0, np.arange(3)).tolist() == [0, 1, 2]
    np.testing.assert_allclose(cand.scores[0], 1 / (1 + np.exp(-logits[0, 0])), rtol=1e-6)
    np.testing.assert_allclose(cand.boxes[0, 0], [160, 120, 480, 200])


def test_decode_nms4_counts_num_dets():
    num = np.array([[1], [0]], np.int32)
    boxes = np.tile(np.array([10, 10, 50, 50], np.float32), (2, 3, 1))
    scores = np.full((2, 3), 0.9, np.float32)
    classes = np.ones((2, 3), np.int32)
    cand = decode("nms4", [num, boxes, scores, classes], (640, 640),
                  ["num_dets", "det_boxes", "det_scores", "det_classes"])
    assert cand.valid.tolist() == [1, 0] and not cand.needs_nms


def test_fixed_batch_pads_to_n_and_drops_the_padding():
    seen = []

    def engine(images):  # what a fixed-batch-4 model does: refuses other sizes
        assert len(images) == 4
        seen.append(len(images))
        return [np.asarray(images).sum(axis=(1, 2, 3)), np.arange(4)[:, None]]

    infer = fixed_batch(engine, 4)
    images = np.ones((3, 3, 2, 2), np.float32)
    out = infer(images)
    assert [o.shape[0] for o in out] == [3, 3] and out[0].tolist() == [12, 12, 12] and seen == [4]
    assert fixed_batch(engine, None) is engine


def test_input_slot_widens_within_its_buffer():
    slot = InputSlot(0, 1000, (3, 3, 2, 2), np.dtype(np.float32), capacity=8)
    wide = slot.widened(8)
    assert wide.shape[0] == 8 and wide.ptr == 1000 and not wide.owner
    half = slot[2:3]
    assert half.capacity == 6
    with pytest.raises(RuntimeError, match="fixed batch 8"):
        half.widened(8)
