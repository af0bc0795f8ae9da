"""A model that fails in the engine ends the run in one `error:` line naming the model, the batch
shape and the engine's cause (with a hint), exit 1, run.json `failed`; the traceback only with --debug."""

import json

import onnx
import pytest
from onnx import TensorProto, helper

from bulkdet.run.model_errors import ModelRunError, engine_cause, model_run_error
from conftest import make_images

I64 = TensorProto.INT64


def square_only(src, dst):
    """The analytic detector behind a Reshape to [B, 3, 640, 640]: any other input size fails at run time."""
    model = onnx.load(str(src))
    g = model.graph
    for node in g.node:
        node.input[:] = ["images_sq" if i == "images" else i for i in node.input]
    g.node.insert(0, helper.make_node("Constant", [], ["sq_shape"], value=helper.make_tensor(
        "sq_shape", I64, [4], [0, 3, 640, 640])))
    g.node.insert(1, helper.make_node("Reshape", ["images", "sq_shape"], ["images_sq"]))
    onnx.save(model, str(dst))
    return dst


def custom_op(src, dst):
    """The analytic detector with an op of a custom domain no ONNX Runtime has."""
    model = onnx.load(str(src))
    g = model.graph
    for node in g.node:
        node.input[:] = ["images_x" if i == "images" else i for i in node.input]
    g.node.insert(0, helper.make_node("Frobnicate", ["images"], ["images_x"], domain="com.example.ops"))
    model.opset_import.append(helper.make_opsetid("com.example.ops", 1))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from bulkdet.ingest.pack import pack

    root = tmp_path_factory.mktemp("model_errors")
    make_images(root / "src", [("wide.jpg", 640, 480, "jpeg", 1), ("tall.png", 300, 900, "png", 1)], seed=5)
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds"


def _one_error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_a_shape_the_model_rejects_is_one_line_and_a_failed_run(tmp_path, analytic_model, cli, dataset):
    model = square_only(analytic_model, tmp_path / "square.onnx")
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q", "--max-batch", "1")
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert line.startswith("error: the model square.onnx failed on a batch of shape [1, 3, "), line
    assert "Reshape" in line and "--imgsz" in line and "Traceback" not in r.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["state"] == "failed" and "square.onnx failed on a batch of shape" in run["error"]


def test_debug_shows_the_engine_traceback(tmp_path, analytic_model, cli, dataset):
    model = square_only(analytic_model, tmp_path / "square.onnx")
    with pytest.raises(ModelRunError) as exc:
        cli("--debug", "run", dataset, "--model", model, "--out", tmp_path / "run", "-q")
    assert exc.value.__cause__ is not None  # the engine's own exception, chained


def test_an_op_the_engine_lacks_is_one_line_at_start(tmp_path, analytic_model, cli, dataset):
    model = custom_op(analytic_model, tmp_path / "custom.onnx")
    r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q", "--device", "cpu")
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert line.startswith("error: onnxruntime could not load the model custom.onnx: "), line
    assert "Frobnicate" in line and "standard ONNX ops" in line
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["state"] == "failed" and "Frobnicate" in run["error"]


def test_the_cause_is_one_line_without_onnxruntime_prefix_and_hints_follow_it():
    exc = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: images "
                       "for the following indices\n index: 0 Got: 2 Expected: 8\n Please fix either the inputs")
    assert engine_cause(exc) == ("Got invalid dimensions for input: images for the following indices index: 0 "
                                 "Got: 2 Expected: 8 Please fix either the inputs")
    text = str(model_run_error("m.onnx", (2, 3, 640, 640), exc))
    assert text.startswith("the model m.onnx failed on a batch of shape [2, 3, 640, 640]: Got invalid") and "--max-batch" in text
    oom = str(model_run_error("m.onnx", (1, 3, 640, 640), RuntimeError("out of memory with a batch of one image")))
    assert "--imgsz" in oom and "memory" in oom.split("hint:")[1]
    op = str(model_run_error("m.onnx", (1, 3, 64, 64), RuntimeError("Could not find an implementation for Foo"), "fp16"))
    assert "--precision fp32" in op
    assert "hint" not in str(model_run_error("m.onnx", (1, 3, 64, 64), RuntimeError("something odd")))
