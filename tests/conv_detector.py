"""A small real convolutional detector for precision tests (INT8 quantizes its Conv).

It is the analytic red/green/blue detector with the colour test done by a 1x1 Conv:
excess_c = 2*c - (sum of the other two channels), 2 for a pure colour, about 0 for the gray
background and padding; a pixel belongs to class c when excess_c > 1 (the half-way point of
a blurred edge, as in the analytic model). Same output layout, so the same truth applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bulkdet.model.info import model_metadata
from bulkdet.synthetic import build_analytic_detector

# Nodes of the analytic model that compute `diff` (channel minus max of the others).
_ANALYTIC_COLOUR_TEST = ("Gather", "ReduceMax", "Sub")


def build_conv_detector(path: Path, scale_boxes: float = 1.0) -> Path:
    """Write the conv detector; `scale_boxes` != 1 makes a deliberately drifting variant (box
    width and height scaled about the centre)."""
    path = Path(path)
    model = onnx.load(str(build_analytic_detector(path.with_suffix(".analytic.onnx"))))
    graph = model.graph
    head = list(graph.node[:3])
    assert tuple(n.op_type for n in head) == _ANALYTIC_COLOUR_TEST, "analytic model changed"
    rest = list(graph.node[3:])
    weights = np.array([[2, -1, -1], [-1, 2, -1], [-1, -1, 2]], np.float32).reshape(3, 3, 1, 1)
    conv = helper.make_node("Conv", ["images", "excess_w", "excess_b"], ["diff"], name="colour_excess")
    inits = [i for i in graph.initializer if i.name not in ("other_idx", "thresh")]
    inits += [numpy_helper.from_array(weights, "excess_w"), numpy_helper.from_array(np.zeros(3, np.float32), "excess_b"),
              numpy_helper.from_array(np.array(1.0, np.float32), "thresh")]
    nodes = [conv] + rest
    if scale_boxes != 1.0:  # scale the w, h rows of the output: boxes drift about their centre
        out = next(n for n in nodes if "output0" in n.output)
        out.output[0] = "output0_exact"
        inits.append(numpy_helper.from_array(np.array([1.0, 1.0, scale_boxes, scale_boxes, 1.0, 1.0, 1.0], np.float32).reshape(1, 7, 1),
                                             "box_scale"))
        nodes.append(helper.make_node("Mul", ["output0_exact", "box_scale"], ["output0"], name="drift"))
    new_graph = helper.make_graph(nodes, "conv_color_rect_detector", list(graph.input), list(graph.output),
                                  initializer=inits)
    new = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="bulkdet.tests")
    new.ir_version = model.ir_version
    helper.set_model_props(new, model_metadata(model))
    onnx.checker.check_model(new, full_check=True)
    onnx.save(new, str(path))
    return path



def packed_dataset(root: Path, specs) -> tuple[Path, list[dict]]:
    """Images from `specs` (see conftest.make_images) packed into root/ds; (dataset, truth)."""
    from conftest import make_images

    from bulkdet.ingest.pack import pack

    truth = make_images(root / "src", specs)
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds", truth
