"""Model preparation (FP16, INT8 Q/DQ calibrated through bulkdet's own preprocessing, cache)
and the precision check, all on the CPU with real ONNX Runtime and DALI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conv_detector import build_conv_detector, packed_dataset
from onnx import TensorProto, helper

from bulkdet.synthetic import compare_with_truth
from bulkdet.model.info import load_model_info, model_metadata
from bulkdet.run.calibration import decoded_batches
from bulkdet.run.plan import plan_batches
from bulkdet.run.postprocess import Detections
from bulkdet.run.precision_check import DriftReport, check_precision, first_images, match
from bulkdet.model.precision import (META_PRECISION, Calibration, cache_key, calibration_sample, float_tail_nodes,
                             model_precision, prepare_model)
from bulkdet.store.parts import read_detections
from bulkdet.store.manifest import read_manifest

SPECS = [(f"img{i}.jpg", 160 + 24 * i, 120 + 10 * (i % 4), "jpeg", (1, 6)[i % 2]) for i in range(8)]
IMGSZ = 256


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return packed_dataset(tmp_path_factory.mktemp("prep"), SPECS)


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    return build_conv_detector(tmp_path_factory.mktemp("conv") / "conv.onnx")


@pytest.fixture(scope="module")
def int8_model(conv_model, dataset, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_model(conv_model, "int8", Calibration(dataset[0], images=6, imgsz=IMGSZ, feed=decoded_batches), cache), cache


def _letterboxed(n=2, h=IMGSZ, w=IMGSZ):
    """A gray batch with one pure red and one pure blue rectangle per image."""
    x = np.full((n, 3, h, w), 114 / 255, np.float32)
    x[:, :, 20:60, 30:90] = np.array([1, 0, 0], np.float32)[:, None, None]
    x[:, :, 100:180, 120:200] = np.array([0, 0, 1], np.float32)[:, None, None]
    return x


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    return sess.run(None, {inp.name: x.astype(np.float16 if inp.type == "tensor(float16)" else np.float32)})[0]


def test_fp16_is_a_float16_model_with_the_same_boxes_and_is_cached(conv_model, tmp_path):
    first = prepare_model(conv_model, "fp16", cache=tmp_path)
    info = load_model_info(first.path)
    assert info.input_dtype == np.float16  # the decoder writes float16 straight away
    assert info.names == {0: "red", 1: "green", 2: "blue"}  # the source's metadata is kept
    assert model_precision(first.path) == "fp16" and not first.cached
    weights = [i for i in onnx.load(str(first.path)).graph.initializer if i.name == "excess_w"]
    assert weights[0].data_type == TensorProto.FLOAT16
    x = _letterboxed()
    np.testing.assert_allclose(_run(first.path, x).astype(np.float32), _run(conv_model, x), atol=0.5)
    again = prepare_model(conv_model, "fp16", cache=tmp_path)
    assert again.cached and again.path == first.path and again.sha256 == first.sha256


def test_int8_is_symmetric_qdq_that_runs_on_cpu(conv_model, int8_model):
    prepared, _ = int8_model
    model = onnx.load(str(prepared.path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # TensorRT reads int8 Q/DQ with zero point 0 only.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)
    # The box arithmetic after the Conv stays float: only the Conv's neighbours are quantized.
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized <= {"images", "diff", "excess_w"}, quantized
    calib = json.loads(model_metadata(model)["bulkdet.calibration"])
    assert calib["images"] == 6 and calib["input_hw"] == [IMGSZ, IMGSZ]
    x = _letterboxed()
    np.testing.assert_allclose(_run(prepared.path, x), _run(conv_model, x), atol=1.0)


def test_int8_for_the_cpu_uses_uint8_activations(conv_model, dataset, int8_model):
    gpu, cache = int8_model
    cpu = prepare_model(conv_model, "int8", Calibration(dataset[0], images=6, imgsz=IMGSZ, target="cpu", feed=decoded_batches), cache)
    assert cpu.path != gpu.path and ".int8-cpu." in cpu.path.name and ".int8-gpu." in gpu.path.name
    model = onnx.load(str(cpu.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = {n.input[0]: inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points["images"].dtype == np.uint8  # activations: uint8 with a zero point
    x = _letterboxed()
    np.testing.assert_allclose(_run(cpu.path, x), _run(conv_model, x), atol=1.0)


def test_cache_key_covers_source_precision_and_calibration_sample(conv_model, dataset):
    tools = {"onnxruntime": "1"}
    base = cache_key("a" * 64, "int8", {"content_sha256": "x", "images": 6}, tools)
    assert base == cache_key("a" * 64, "int8", {"images": 6, "content_sha256": "x"}, tools)
    assert len({base, cache_key("b" * 64, "int8", {"content_sha256": "x", "images": 6}, tools),
                cache_key("a" * 64, "fp16", None, tools),
                cache_key("a" * 64, "int8", {"content_sha256": "y", "images": 6}, tools),
                cache_key("a" * 64, "int8", {"content_sha256": "x", "images": 6}, {"onnxruntime": "2"})}) == 5
    one = calibration_sample(Calibration(dataset[0], images=4, seed=0, imgsz=IMGSZ), conv_model)
    other_seed = calibration_sample(Calibration(dataset[0], images=4, seed=1, imgsz=IMGSZ), conv_model)
    same = calibration_sample(Calibration(dataset[0], images=4, seed=0, imgsz=IMGSZ), conv_model)
    assert len(one.rows) == 4 and one.identity == same.identity
    assert one.identity["content_sha256"] != other_seed.identity["content_sha256"]


def test_int8_cache_hit_and_miss(conv_model, dataset, int8_model):
    prepared, cache = int8_model
    hit = prepare_model(conv_model, "int8", Calibration(dataset[0], images=6, imgsz=IMGSZ, feed=decoded_batches), cache)
    assert hit.cached and hit.path == prepared.path
    assert json.loads(hit.path.with_suffix(".json").read_text())["calibration"]["images"] == 6


def test_prepare_refuses_what_it_cannot_do(conv_model, int8_model, tmp_path):
    prepared, _ = int8_model
    with pytest.raises(ValueError, match="already prepared as int8"):
        prepare_model(prepared.path, "fp16", cache=tmp_path)
    with pytest.raises(ValueError, match="calibration"):
        prepare_model(conv_model, "int8", None, tmp_path)
    assert prepare_model(prepared.path, "int8", cache=tmp_path).path == prepared.path  # used as it is


def test_float_tail_nodes_are_the_nodes_after_the_last_weighted_op():
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w"], ["c"], name="conv2"),
             helper.make_node("Sigmoid", ["c"], ["d"], name="sigmoid"),
             helper.make_node("Concat", ["a", "d"], ["y"], name="concat", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", f, None)],
                              [helper.make_tensor("w", f, [1, 1, 1, 1], [1.0])])
    assert float_tail_nodes(graph) == ["sigmoid", "concat"]


def test_prepare_cli(cli, conv_model, dataset, tmp_path):
    out = tmp_path / "model.int8.onnx"
    r = cli("prepare", conv_model, "--precision", "int8", "--calib", dataset[0], "--calib-images", "3",
            "--imgsz", IMGSZ, "--out", out, "--cache-dir", tmp_path / "cache", "-q")
    assert r.exit_code == 0, r.output
    assert model_precision(out) == "int8" and "prepared" in r.output
    r = cli("prepare", conv_model, "--precision", "int8", "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 2 and "--calib" in r.output


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_run_with_precision_checks_drift_and_finds_the_truth(cli, conv_model, dataset, tmp_path, precision):
    ds, truth = dataset
    run_dir = tmp_path / "run"
    r = cli("run", ds, "--model", conv_model, "--out", run_dir, "--precision", precision, "--check-precision", 5,
            "--calib-images", 4, "--imgsz", IMGSZ, "--cache-dir", tmp_path / "cache", "-q")
    assert r.exit_code == 0, r.output
    assert f"precision check, {precision} vs fp32 on 5 images" in r.output
    run_json = json.loads((run_dir / "run.json").read_text())
    check = run_json["precision_check"]
    assert check["images"] == 5 and check["reference_boxes"] > 0
    assert check["matched"] == check["reference_boxes"] == check["boxes"] and check["drifting"] == 0
    assert run_json["model"]["prepared"]["precision"] == precision
    problems = compare_with_truth(truth, read_detections(run_dir).to_pylist(), imgsz=IMGSZ)
    assert not problems, problems


def test_check_precision_reports_boxes_that_drift(conv_model, dataset, tmp_path):
    from bulkdet.run.decode import Decoder
    from bulkdet.engines import create_engine
    from bulkdet.run.precision_check import Detector
    from bulkdet.store.shards import ShardReader

    ds, _ = dataset
    drifting = build_conv_detector(tmp_path / "drift.onnx", scale_boxes=1.2)
    batches = plan_batches(first_images(read_manifest(ds), 5), (IMGSZ, IMGSZ), 3)
    assert [len(b) for b in batches] == [3, 2]
    decoder = Decoder("cpu", 3)
    reader = ShardReader(ds / "shards")
    detect = [Detector(create_engine("onnxruntime", m), decoder, lambda outputs: "yolov8", 0.25, 0.45, 300)
              for m in (conv_model, drifting)]
    report = check_precision(batches, lambda b: reader.get_many(b.shard, b.keys), *detect, "int8")
    reader.close()
    summary = report.as_dict()
    assert summary["images"] == 5 and summary["reference_boxes"] > 0
    # Boxes 1.2x wider and taller: IoU about 1/1.44, matched but drifting.
    assert summary["iou_below"] > 0 and summary["drifting"] > 0 and summary["min_iou"] < 0.9
    assert summary["examples"][0]["kind"].startswith("iou") and "fp32" in summary["examples"][0]


def _dets(boxes, scores, classes):
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(classes, np.int16))


def test_drift_report_counts_each_kind():
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [70, 70, 90, 90]], [0.9, 0.8, 0.7, 0.6],
                [0, 0, 1, 2])
    test = _dets([[0, 0, 10, 10], [21, 21, 42, 41], [50, 50, 60, 60], [100, 100, 110, 110]], [0.92, 0.8, 0.5, 0.6],
                 [0, 0, 1, 0])
    assert sorted((r, t) for r, t, _ in match(ref, test)) == [(0, 0), (1, 1), (2, 2)]
    report = DriftReport("fp16")
    report.add_image("a.jpg", ref, test)
    d = report.as_dict()
    assert (d["matched"], d["iou_below"], d["score_diff_above"], d["missed"], d["extra"]) == (3, 1, 1, 1, 1)
    assert d["drifting"] == 4 and {e["kind"] for e in d["examples"]} == {"iou", "score", "missed", "extra"}
    assert "4 drifting" in report.summary()


def test_model_precision_metadata_key(conv_model):
    assert model_precision(conv_model) is None and META_PRECISION == "bulkdet.precision"


def _raw_predictions_model(path, nc=4, n=300):
    """A 'detector' whose output is its input: raw YOLOv8 predictions [B, 4+nc, N] fed directly."""
    x = helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", 4 + nc, n])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + nc, n])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["raw"], ["output0"])], "raw", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("max_det", [300, 7])
def test_nms_in_the_graph_selects_what_the_host_selects(tmp_path, max_det):
    from bulkdet.model.graph_nms import add_nms
    from bulkdet.run.plan import Batch, letterbox
    from bulkdet.run.postprocess import postprocess

    nc, n, size = 4, 300, 200
    rng = np.random.default_rng(1)
    raw = np.concatenate([rng.uniform(0, size, (2, 2, n)), rng.uniform(4, 60, (2, 2, n)),
                          rng.uniform(0, 0.6, (2, nc, n))], axis=1).astype(np.float32)
    plain = _raw_predictions_model(tmp_path / "raw.onnx", nc, n)
    add_nms(plain, tmp_path / "nms.onnx", conf=0.25, iou=0.45, max_det=max_det)
    (end2end,) = ort.InferenceSession(str(tmp_path / "nms.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"raw": raw})
    assert end2end.shape == (2, max_det, 6)
    wh = np.full(2, size, np.int32)
    batch = Batch(0, 0, np.arange(2), ["a", "b"], [b"a", b"b"], wh, wh, (size, size), letterbox(wh, wh, size, size))
    host = postprocess([raw], batch, "yolov8", 0.25, 0.45, max_det)
    graph = postprocess([end2end], batch, "end2end", 0.25, 0.45, max_det)
    for i, (h, g) in enumerate(zip(host, graph)):
        candidates = int((raw[i, 4:].max(0) > 0.25).sum())
        assert 5 < len(h) < candidates and len(g) == len(h)  # NMS removed overlapping boxes
        np.testing.assert_allclose(g.scores, h.scores, rtol=1e-6)
        np.testing.assert_array_equal(g.class_ids, h.class_ids)
        np.testing.assert_allclose(g.boxes, h.boxes, atol=1e-3)


def test_run_with_nms_in_the_model_checks_itself_against_host_nms(cli, conv_model, dataset, tmp_path):
    ds, truth = dataset
    run_dir = tmp_path / "run"
    r = cli("run", ds, "--model", conv_model, "--out", run_dir, "--nms-in-model", "--check-precision", 4,
            "--imgsz", IMGSZ, "--cache-dir", tmp_path / "cache", "-q")
    assert r.exit_code == 0, r.output
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["model"]["prepared"]["nms"] is True
    check = run_json["precision_check"]
    assert check["precision"] == "fp32+nms" and check["matched"] == check["reference_boxes"] > 0
    assert check["drifting"] == 0
    assert not compare_with_truth(truth, read_detections(run_dir).to_pylist(), imgsz=IMGSZ)
