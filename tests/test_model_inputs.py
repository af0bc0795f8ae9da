"""Models with inputs besides the image (RT-DETR's orig_target_sizes, PaddleDetection's im_shape
and scale_factor) get what they mean, end to end with exact boxes; unknown ones are refused in one line."""

import json

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper

from bulkdet.model.info import ExtraInput, extra_input_values, load_model_info
from bulkdet.synthetic import compare_with_truth
from conftest import make_images
from test_layouts_e2e import SPECS, _common, _const, rewire

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def with_inputs(src, dst, kind):
    """The analytic detector as boxes [B, N, 4] + scores [B, N, nc], its boxes computed from
    normalised ones and the extra inputs `kind` names (real ops: a wrong value gives wrong boxes)."""
    model = onnx.load(str(rewire(src, dst)))
    g = model.graph
    for node in g.node:
        node.output[:] = ["v8" if o == "output0" else o for o in node.output]
    n = helper.make_node
    nodes = _common() + [
        # normalised x1, y1, x2, y2: the xyxy boxes over the input's W, H, W, H
        n("Div", ["rl_xyxy", "rl_whwh"], ["ex_norm"]),
        *([] if kind == "rtdetr" else [n("Identity", ["rl_cls"], ["scores"])]),
        _const("ex_ax1", [1]),
    ]
    if kind in ("orig_target_sizes", "rtdetr"):  # RT-DETR / D-FINE: boxes * (W, H, W, H)
        inputs = [helper.make_tensor_value_info("orig_target_sizes", I64, ["batch", 2])]
        nodes += [n("Cast", ["orig_target_sizes"], ["ex_wh"], to=F),
                  n("Concat", ["ex_wh", "ex_wh"], ["ex_whwh"], axis=1),
                  n("Unsqueeze", ["ex_whwh", "ex_ax1"], ["ex_scale"]),
                  n("Mul", ["ex_norm", "ex_scale"], ["boxes"])]
    elif kind == "paddle":  # PaddleDetection: boxes in im_shape (H, W) pixels, divided by scale_factor (sy, sx)
        inputs = [helper.make_tensor_value_info("im_shape", F, ["batch", 2]),
                  helper.make_tensor_value_info("scale_factor", F, ["batch", 2])]
        nodes += [_const("ex_rev", [1, 0]),
                  n("Gather", ["im_shape", "ex_rev"], ["ex_wh"], axis=1),
                  n("Gather", ["scale_factor", "ex_rev"], ["ex_sxy"], axis=1),
                  n("Div", ["ex_wh", "ex_sxy"], ["ex_px"]),
                  n("Concat", ["ex_px", "ex_px"], ["ex_whwh"], axis=1),
                  n("Unsqueeze", ["ex_whwh", "ex_ax1"], ["ex_scale"]),
                  n("Mul", ["ex_norm", "ex_scale"], ["boxes"])]
    else:  # an input bulkdet does not know
        inputs = [helper.make_tensor_value_info(kind, F, ["batch", 2])]
        nodes += [n("ReduceSum", [kind], ["ex_sum"], keepdims=1),
                  n("Unsqueeze", ["ex_sum", "ex_ax1"], ["ex_add"]),
                  n("Add", ["rl_xyxy", "ex_add"], ["boxes"])]
    outputs = [helper.make_tensor_value_info("boxes", F, ["batch", 3, 4]),
               helper.make_tensor_value_info("scores", F, ["batch", 3, 3])]
    if kind == "rtdetr":  # with its post-processor: labels [B, K] int64, boxes [B, K, 4], scores [B, K]
        nodes += [_const("ex_ax2", [2]), n("Squeeze", ["rl_argmax", "ex_ax2"], ["labels"]),
                  n("Squeeze", ["rl_best", "ex_ax2"], ["scores"])]
        outputs = [helper.make_tensor_value_info("labels", I64, ["batch", 3]), outputs[0],
                   helper.make_tensor_value_info("scores", F, ["batch", 3])]
    g.node.extend(nodes)
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from bulkdet.ingest.pack import pack

    root = tmp_path_factory.mktemp("inputs")
    truth = make_images(root / "src", [(f"x{rel}", w, h, fmt, o) for rel, w, h, fmt, o in SPECS], seed=3)
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds", truth


@pytest.mark.parametrize("kind,layout", [("orig_target_sizes", "boxes-scores"), ("paddle", "boxes-scores"),
                                         ("rtdetr", "nms4")])
def test_known_extra_inputs_are_fed_what_they_mean(tmp_path, analytic_model, cli, packed, kind, layout):
    model = with_inputs(analytic_model, tmp_path / f"{kind}.onnx", kind)
    info = load_model_info(model)
    assert info.input_name == "images" and [e.name for e in info.extra_inputs] == (
        ["im_shape", "scale_factor"] if kind == "paddle" else ["orig_target_sizes"])
    dataset, truth = packed
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "run" / "detections").to_pylist()
    assert len(rows) > 0 and compare_with_truth(truth, rows) == []
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model"]["layout"] == layout


def test_extra_input_values_follow_the_batch_input():
    extras = [ExtraInput("orig_target_sizes", np.int64, (None, 2)), ExtraInput("im_shape", np.float32, (None, 2)),
              ExtraInput("scale_factor", np.float32, (None, 2))]
    values = extra_input_values(extras, 3, 384, 640)
    assert values["orig_target_sizes"].dtype == np.int64 and values["orig_target_sizes"].tolist() == [[640, 384]] * 3
    assert values["im_shape"].dtype == np.float32 and values["im_shape"].tolist() == [[384, 640]] * 3
    assert values["scale_factor"].tolist() == [[1.0, 1.0]] * 3


def test_an_unknown_extra_input_is_one_error_line(tmp_path, analytic_model, cli, packed):
    model = with_inputs(analytic_model, tmp_path / "odd.onnx", "prompt_embedding")
    dataset, _ = packed
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "prompt_embedding [?, 2]" in lines[0] and "orig_target_sizes" in lines[0] and "scale_factor" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_extra_inputs_with_prepared_precisions(tmp_path, analytic_model, cli, packed, precision):
    """FP16 conversion keeps the extra inputs; INT8 calibration feeds them as a run does."""
    model = with_inputs(analytic_model, tmp_path / "rtdetr.onnx", "rtdetr")
    dataset, truth = packed
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q", "--precision", precision,
            "--cache-dir", tmp_path / "cache", "--calib-images", "3")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "run" / "detections").to_pylist()
    assert len(rows) > 0 and compare_with_truth(truth, rows) == []
