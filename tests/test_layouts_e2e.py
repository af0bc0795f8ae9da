"""The YOLOv5 [B,N,5+nc] and end-to-end [B,K,6] layouts give the same boxes as YOLOv8's.

The analytic detector's graph is extended with real ONNX ops into the other layouts.
"""

import onnx
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper

from bulkdet.synthetic import compare_with_truth
from conftest import make_images


def _const(name, values):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                             [len(values)], values))


def relayout(src, dst, layout):
    model = onnx.load(str(src))
    g = model.graph
    g.output[0].name = "v8"
    for node in g.node:
        node.output[:] = ["v8" if o == "output0" else o for o in node.output]
    nodes = [
        helper.make_node("Transpose", ["v8"], ["rl_t"], perm=[0, 2, 1]),  # [B, N, 4+nc]
        _const("rl_s0", [0]), _const("rl_s4", [4]), _const("rl_s7", [7]), _const("rl_ax", [2]),
        helper.make_node("Slice", ["rl_t", "rl_s0", "rl_s4", "rl_ax"], ["rl_xywh"]),
        helper.make_node("Slice", ["rl_t", "rl_s4", "rl_s7", "rl_ax"], ["rl_cls"]),
        helper.make_node("ReduceMax", ["rl_cls"], ["rl_best"], axes=[2], keepdims=1),
    ]
    if layout == "yolov5":  # objectness = best class score; classes as they are
        nodes.append(helper.make_node("Concat", ["rl_xywh", "rl_best", "rl_cls"], ["output0"], axis=2))
    else:  # x1, y1, x2, y2, score, class
        nodes += [
            _const("rl_s2", [2]),
            helper.make_node("Slice", ["rl_xywh", "rl_s0", "rl_s2", "rl_ax"], ["rl_cxcy"]),
            helper.make_node("Slice", ["rl_xywh", "rl_s2", "rl_s4", "rl_ax"], ["rl_wh"]),
            helper.make_node("Constant", [], ["rl_half"], value=helper.make_tensor("rl_half", TensorProto.FLOAT, [], [0.5])),
            helper.make_node("Mul", ["rl_wh", "rl_half"], ["rl_hwh"]),
            helper.make_node("Sub", ["rl_cxcy", "rl_hwh"], ["rl_p1"]),
            helper.make_node("Add", ["rl_cxcy", "rl_hwh"], ["rl_p2"]),
            helper.make_node("ArgMax", ["rl_cls"], ["rl_argmax"], axis=2, keepdims=1),
            helper.make_node("Cast", ["rl_argmax"], ["rl_clsf"], to=TensorProto.FLOAT),
            helper.make_node("Concat", ["rl_p1", "rl_p2", "rl_best", "rl_clsf"], ["output0"], axis=2),
        ]
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", "n", "k"]))
    g.output.remove(g.output[0])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("layout", ["yolov5", "end2end"])
def test_other_layouts_give_exact_boxes(tmp_path, analytic_model, cli, layout):
    model = relayout(analytic_model, tmp_path / f"{layout}.onnx", layout)
    truth = make_images(tmp_path / "src", [("a.jpg", 640, 480, "jpeg", 6), ("b.png", 300, 900, "png", 1),
                                           ("c.jpg", 1500, 200, "jpeg", 3)], seed=7)
    cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q")
    r = cli("run", tmp_path / "ds", "--model", model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "run" / "detections").to_pylist()
    assert compare_with_truth(truth, rows) == []
