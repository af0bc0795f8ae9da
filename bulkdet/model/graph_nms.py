"""NMS inside the model: `run --nms-in-model` appends it to a YOLOv8-layout graph.

The raw YOLOv8 output is [B, 4+nc, N] (84 x 8400 floats per 640x640 image, 2.7 MB); with the
score threshold, per-class NMS and the top-K selection in the graph, the engine returns
[B, max_det, 6] (x1, y1, x2, y2, score, class), the "end2end" layout the post-processing
already reads. On the GPU this runs on the device and only final detections are copied to the
host; the host no longer scans 8400 anchors x 80 classes per image.

Standard ONNX ops only (NonMaxSuppression, ScatterND, TopK, GatherElements...), so the same
file runs in ONNX Runtime (CPU, CUDA) and TensorRT. Semantics follow the host post-processing:
one class per anchor (its best), class-aware NMS, scores above `conf`, at most `max_det` per
image by score. Rows past the last detection have score 0 and are dropped downstream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bulkdet.model.info import layout_hint, model_metadata, parse_names
from bulkdet.model.layouts import LayoutError, describe, detect

MIN_OPSET = 13  # Unsqueeze with axes as an input
NMS_VERSION = 1  # bump when the appended graph changes: cached models are made again


def add_nms(source: Path, out: Path, conf: float, iou: float, max_det: int) -> None:
    """Write `source` with NMS appended to its first output (YOLOv8 layout [B, 4+nc, N])."""
    model = onnx.load(str(source))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"{source}: opset {opset}; NMS in the model needs opset {MIN_OPSET} or newer")
    graph = model.graph
    raw = graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in raw.type.tensor_type.shape.dim]
    meta = model_metadata(model)
    _check_layout(source, graph, meta)
    if len(dims) != 3 or str(meta.get("end2end", "")).lower() == "true":
        raise ValueError(f"{source}: NMS in the model needs a raw YOLOv8 output [B, 4+nc, N], got {dims}")
    nc = _classes(model, dims)
    nodes, inits = _nms_tail(raw.name, nc, conf, iou, max_det, opset)
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("detections", TensorProto.FLOAT, [dims[0], max_det, 6]))
    helper.set_model_props(model, {**meta, "end2end": "True", "bulkdet.nms": f"conf={conf} iou={iou} max_det={max_det}"})
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _check_layout(source: Path, graph, meta: dict) -> None:
    """LayoutError (a ValueError) naming the layout when the model's outputs are not the raw YOLOv8 one."""
    outputs = [(o.name, tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                              for d in o.type.tensor_type.shape.dim)) for o in graph.output]
    nc = len(parse_names(meta.get("names", ""))) or None
    end2end = str(meta.get("end2end", "")).lower() == "true"
    try:
        layout = detect(outputs, nc, end2end, layout_hint(meta))
    except LayoutError:
        layout = "unknown"
    if layout not in ("yolov8", None):
        raise LayoutError(f"{source}: NMS in the model supports the yolov8 layout [B, 4+nc, N] only; this model's "
                         f"outputs {describe(outputs)} are the {layout} layout: run without --nms-in-model "
                         f"(bulkdet applies the NMS its layout needs)")


def _classes(model: onnx.ModelProto, dims: list) -> int:
    """nc from the output's shape (after shape inference when exporters leave it out), else the names."""
    if dims[1] is None:
        inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inferred.type.tensor_type.shape.dim]
    if dims and dims[1] is not None and dims[1] > 4:
        return dims[1] - 4
    names = parse_names(model_metadata(model).get("names", ""))
    if not names:
        raise ValueError("NMS in the model: the number of classes is neither in the output shape nor in the names")
    return len(names)


def _nms_tail(raw: str, nc: int, conf: float, iou: float, max_det: int, opset: int):
    def c(name, value, dtype):
        return numpy_helper.from_array(np.asarray(value, dtype), f"nms_{name}")

    inits = [c("zero", [0], np.int64), c("four", [4], np.int64), c("end", [4 + nc], np.int64),
             c("axis1", [1], np.int64), c("axis2", [2], np.int64), c("max_det", [max_det], np.int64),
             c("iou", [iou], np.float32), c("conf", [conf], np.float32), c("k", [max_det], np.int64),
             c("pad_cols", [max_det], np.int64), c("zero_f", 0.0, np.float32), c("half", 0.5, np.float32),
             c("minus_one", [-1], np.int64), c("xy", [0, 1], np.int64), c("wh", [2, 3], np.int64)]
    n = helper.make_node
    nodes = [
        n("Cast", [raw], ["nms_out"], to=TensorProto.FLOAT),  # NMS takes float32 (FP16 models too)
        n("Slice", ["nms_out", "nms_zero", "nms_four", "nms_axis1"], ["nms_xywh_t"]),  # [B,4,N]
        n("Slice", ["nms_out", "nms_four", "nms_end", "nms_axis1"], ["nms_cls"]),  # [B,nc,N]
        n("Transpose", ["nms_xywh_t"], ["nms_xywh"], perm=[0, 2, 1]),  # [B,N,4] cx, cy, w, h
        # One class per anchor, as on the host: other classes' scores are zeroed.
        # (ReduceMax takes its axes as an input from opset 18 on, as an attribute before.)
        n("ReduceMax", ["nms_cls", "nms_axis1"], ["nms_best"], keepdims=1) if opset >= 18 else
        n("ReduceMax", ["nms_cls"], ["nms_best"], axes=[1], keepdims=1),
        n("Equal", ["nms_cls", "nms_best"], ["nms_is_best"]),
        n("Where", ["nms_is_best", "nms_cls", "nms_zero_f"], ["nms_scores"]),
        n("NonMaxSuppression", ["nms_xywh", "nms_scores", "nms_max_det", "nms_iou", "nms_conf"], ["nms_sel"],
          center_point_box=1),  # [M,3]: image, class, anchor
        n("GatherND", ["nms_scores", "nms_sel"], ["nms_sel_score"]),  # [M]
        # Kept scores into a dense [B, nc*N (+ max_det padding)] grid; TopK picks each image's best.
        n("Shape", ["nms_scores"], ["nms_shape"]),  # B, nc, N
        n("Gather", ["nms_shape", "nms_zero"], ["nms_b"], axis=0),
        n("Gather", ["nms_shape", "nms_axis2"], ["nms_n"], axis=0),
        n("Mul", ["nms_n", "nms_end"], ["nms_cells_wide"]),  # N*(4+nc) >= nc*N + max_det cells needed
        n("Add", ["nms_cells_wide", "nms_pad_cols"], ["nms_cells"]),
        n("Concat", ["nms_b", "nms_cells"], ["nms_grid_shape"], axis=0),
        n("ConstantOfShape", ["nms_grid_shape"], ["nms_grid0"],
          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        n("Gather", ["nms_sel", "nms_zero"], ["nms_img"], axis=1),  # [M,1]
        n("Gather", ["nms_sel", "nms_axis1"], ["nms_cls_id"], axis=1),
        n("Gather", ["nms_sel", "nms_axis2"], ["nms_anchor"], axis=1),
        n("Mul", ["nms_cls_id", "nms_n"], ["nms_cls_off"]),
        n("Add", ["nms_cls_off", "nms_anchor"], ["nms_cell"]),  # class * N + anchor
        n("Concat", ["nms_img", "nms_cell"], ["nms_index"], axis=1),  # [M,2]
        n("ScatterND", ["nms_grid0", "nms_index", "nms_sel_score"], ["nms_grid"]),
        n("TopK", ["nms_grid", "nms_k"], ["nms_top_score", "nms_top_cell"], axis=1),  # [B,K]
        n("Div", ["nms_top_cell", "nms_n"], ["nms_top_cls"]),  # integer division
        n("Mod", ["nms_top_cell", "nms_n"], ["nms_top_anchor"]),
        # Boxes of the chosen anchors: GatherElements along N with the index repeated over 4.
        n("Unsqueeze", ["nms_top_anchor", "nms_minus_one"], ["nms_idx1"]),  # [B,K,1]
        n("Concat", ["nms_idx1", "nms_idx1", "nms_idx1", "nms_idx1"], ["nms_idx4"], axis=2),
        n("GatherElements", ["nms_xywh", "nms_idx4"], ["nms_top_xywh"], axis=1),  # [B,K,4]
        n("Gather", ["nms_top_xywh", "nms_xy"], ["nms_cxy"], axis=2),
        n("Gather", ["nms_top_xywh", "nms_wh"], ["nms_wh_"], axis=2),
        n("Mul", ["nms_wh_", "nms_half"], ["nms_half_wh"]),
        n("Sub", ["nms_cxy", "nms_half_wh"], ["nms_x1y1"]),
        n("Add", ["nms_cxy", "nms_half_wh"], ["nms_x2y2"]),
        n("Unsqueeze", ["nms_top_score", "nms_minus_one"], ["nms_score_col"]),
        n("Cast", ["nms_top_cls"], ["nms_cls_f"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["nms_cls_f", "nms_minus_one"], ["nms_cls_col"]),
        n("Concat", ["nms_x1y1", "nms_x2y2", "nms_score_col", "nms_cls_col"], ["detections"], axis=2),
    ]
    return nodes, inits
