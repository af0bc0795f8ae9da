"""Bad option values and bad files given on the command line: one `error:` line naming the option
(and its range), the exit code of docs/commands.md, no traceback, nothing written.
The table of these cases is in docs/reliability.md ("Bad option values")."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pyarrow.compute as pc
import pytest
from onnx import TensorProto, helper
from PIL import Image

from bulkdet.choices import MAX_DET, Device
from bulkdet.model.info import load_model_info, parse_names
from bulkdet.model.layouts import LayoutError, detect
from bulkdet.model.precision import prepare_model
from bulkdet.run.postprocess import MAX_NMS_CANDIDATES, postprocess
from bulkdet.store.parts import read_detections, read_images
from bulkdet.system.devices import select
from conftest import make_images, run_bulkdet
from test_postprocess import batch_of, yolov8_output

SPECS = [(f"img_{i}.{'jpg' if i % 2 else 'png'}", 96 + 17 * i, 80 + 9 * i, "jpeg" if i % 2 else "png", 1)
         for i in range(4)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from bulkdet.ingest.pack import pack

    root = tmp_path_factory.mktemp("values")
    make_images(root / "src", SPECS)
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds"


def error_line(result) -> str:
    """The one `error:` line of a failed command; asserts there is no other and no traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return errors[0]


# ----------------------------------------------------------------------------- option ranges

RUN_BAD_VALUES = [
    ("--imgsz", "-64", "32<=x<=8192"), ("--imgsz", "0", "32<=x<=8192"), ("--imgsz", "100000", "32<=x<=8192"),
    ("--imgsz", "abc", "32<=x<=8192"), ("--max-batch", "0", "1<=x<=1024"), ("--max-batch", "100000", "1<=x<=1024"),
    ("--conf", "-1", "0.0<=x<=1.0"), ("--conf", "2", "0.0<=x<=1.0"), ("--conf", "nan", "0.0<=x<=1.0"),
    ("--conf", "inf", "0.0<=x<=1.0"), ("--iou", "-1", "0.0<=x<=1.0"), ("--iou", "nan", "0.0<=x<=1.0"),
    ("--max-det", "-1", "1<=x<=30000"), ("--max-det", "0", "1<=x<=30000"),
    ("--dali-threads", "-1", "1<=x<=1024"), ("--infer-threads", "0", "1<=x<=1024"),
    ("--infer-workers", "0", "1<=x<=1024"), ("--pixel-budget", "0", "1<=x"), ("--decode-budget", "-5", "1<=x"),
    ("--commit-every", "0", "1<=x"), ("--calib-images", "0", "1<=x"), ("--check-precision", "-1", "0<=x"),
    ("--hw-decoder-load", "1.5", "0.0<=x<=1.0"), ("--hw-decoder-load", "nan", "0.0<=x<=1.0"),
    ("--workers", "0", "1<=x<=1024"),
    ("--device", "tpu", "'auto', 'cpu', 'gpu'"), ("--backend", "torch", "'auto', 'onnxruntime', 'tensorrt'"),
    ("--precision", "fp8", "'fp32', 'fp16', 'int8'"),
]


@pytest.mark.parametrize("option,value,allowed", RUN_BAD_VALUES, ids=[f"{o}={v}" for o, v, _ in RUN_BAD_VALUES])
def test_run_refuses_a_bad_option_value_with_one_line_naming_the_option_and_range(
        cli, dataset, analytic_model, tmp_path, option, value, allowed):
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", option, value, "-q")
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert f"'{option}'" in line and allowed in line, line
    assert not (tmp_path / "run").exists()  # refused before anything is written


PACK_BAD_VALUES = [("--shard-size-mb", v, "0.1<=x<=1000000.0") for v in ("0", "-5", "nan", "inf", "1e12", "0.05")] + [
    ("--max-pixels", "0", "1<=x"), ("--max-pixels", "-1", "1<=x")]


@pytest.mark.parametrize("option,value,allowed", PACK_BAD_VALUES, ids=[f"{o}={v}" for o, v, _ in PACK_BAD_VALUES])
def test_pack_refuses_a_bad_option_value(cli, tmp_path, option, value, allowed):
    make_images(tmp_path / "src", SPECS[:1])
    r = cli("pack", tmp_path / "src", "--out", tmp_path / "ds", option, value)
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert f"'{option}'" in line and allowed in line, line
    assert not (tmp_path / "ds").exists()


def test_pack_takes_a_fractional_shard_size(cli, tmp_path):
    make_images(tmp_path / "src", SPECS)
    r = cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "--shard-size-mb", "0.1", "-q")
    assert r.exit_code == 0 and "packed 4 new files" in r.output, r.output


PREPARE_BAD_VALUES = [("--imgsz", "0", "32<=x<=8192"), ("--imgsz", "9000", "32<=x<=8192"),
                      ("--calib-images", "0", "1<=x"), ("--seed", "-1", "0<=x"), ("--target", "tpu", "'gpu', 'cpu'"),
                      ("--precision", "fp8", "'fp32', 'fp16', 'int8'"), ("--precision", "fp32", "fp16 or int8")]


@pytest.mark.parametrize("option,value,allowed", PREPARE_BAD_VALUES,
                         ids=[f"{o}={v}" for o, v, _ in PREPARE_BAD_VALUES])
def test_prepare_refuses_a_bad_option_value(cli, analytic_model, tmp_path, option, value, allowed):
    args = ["--precision", "fp16"] if option != "--precision" else []
    r = cli("prepare", analytic_model, *args, option, value, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert f"'{option}'" in line and allowed in line, line
    assert not (tmp_path / "cache").exists()


def test_the_choices_have_one_home_shared_by_the_cli_and_the_checks(cli, analytic_model, tmp_path):
    assert select(Device.CPU).device == "cpu"
    with pytest.raises(ValueError, match="--device 'tpu' is not one of auto, cpu, gpu"):
        select("tpu")
    with pytest.raises(ValueError, match="--backend 'torch' is not one of auto, onnxruntime, tensorrt"):
        select("cpu", "torch")
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, fp16, int8"):
        prepare_model(analytic_model, "fp8", cache=tmp_path)
    assert MAX_NMS_CANDIDATES == MAX_DET  # --max-det cannot ask for more than NMS keeps
    assert "auto|cpu|gpu" in cli("run", "--help").output


# ------------------------------------------------------------------------------- bad files

def not_models(folder):
    """Files that are no ONNX model: text, a PNG, a truncated model, an empty file."""
    from bulkdet.synthetic import build_analytic_detector

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.onnx").write_text("this is not a model\n")
    Image.new("RGB", (8, 8)).save(folder / "picture.onnx", format="PNG")
    whole = build_analytic_detector(folder / "whole.onnx").read_bytes()
    (folder / "truncated.onnx").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.onnx").write_bytes(b"")
    return [folder / f"{n}.onnx" for n in ("notes", "picture", "truncated", "empty")]


def test_a_file_that_is_no_onnx_model_is_refused_by_run_and_prepare(cli, dataset, tmp_path):
    for model in not_models(tmp_path / "models"):
        r = cli("run", dataset, "--model", model, "--out", tmp_path / "run", "-q")
        assert r.exit_code == 2, r.output
        line = error_line(r)
        assert "'--model'" in line and f"{model} is not an ONNX model" in line, line
        assert not (tmp_path / "run").exists()
        r = cli("prepare", model, "--precision", "fp16", "--cache-dir", tmp_path / "cache")
        assert r.exit_code == 2, r.output
        assert "'MODEL'" in error_line(r) and "is not an ONNX model" in error_line(r)


@pytest.mark.parametrize("content,expected", [
    ("red\ngreen\n", "gives 2 class names, fewer than the model's 3 classes: give a name for every class"),
    ("a\nb\nc\nd\n", "gives 4 class names"),
    ("", "holds no names"),
    ("\n  \n", "holds no names"),
    ('{"person": 0, "car": 1, "bus": 2}', "the keys of a names dict are class ids 0..N-1"),
    ("{0: 'a', 1: 'b', 5: 'c'}", "the keys of a names dict are class ids 0..N-1, got [0, 1, 5]"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not text"),
])
def test_names_that_do_not_fit_the_model_are_refused(cli, dataset, analytic_model, tmp_path, content, expected):
    names = tmp_path / "names.txt"
    names.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = cli("run", dataset, "--model", analytic_model, "--out", tmp_path / "run", "--names", names, "-q")
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert "'--names'" in line and expected in line, line
    assert not (tmp_path / "run").exists()


def test_without_names_the_layout_is_one_that_can_hold_a_class():
    assert detect([("o", (2, 7, 3))], None) == "yolov8"  # was read as YOLOv5 with -2 class columns: argmax crash
    assert detect([("o", (2, 3, 9))], None) == "yolov5"
    with pytest.raises(LayoutError, match=r"outputs o \[2, 4, 5\] fit no layout"):
        detect([("o", (2, 4, 5))], None)


def test_names_that_fit_are_read_in_every_format(analytic_model, tmp_path):
    for text in ("r\ng\nb\n", '["r", "g", "b"]', "{0: 'r', 1: 'g', 2: 'b'}", '{"2": "b", "0": "r", "1": "g"}'):
        (tmp_path / "names").write_text(text)
        assert load_model_info(analytic_model, tmp_path / "names").names == {0: "r", 1: "g", 2: "b"}
    with pytest.raises(ValueError, match="class ids 0..N-1"):
        parse_names("{'a': 'b'}")


def test_paths_that_cannot_be_written_are_refused_before_any_work(cli, analytic_model, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, option in [(("prepare", analytic_model, "--precision", "fp16", "--out", a_file / "m.onnx",
                           "--cache-dir", tmp_path / "cache"), "'--out'"),
                         (("prepare", analytic_model, "--precision", "fp16", "--cache-dir", a_file / "cache"),
                          "'--cache-dir'"),
                         (("demo", "--out", a_file), "'--out'")]:
        r = cli(*args)
        assert r.exit_code == 2, r.output
        line = error_line(r)
        assert option in line and ("is a file" in line), line
    assert not (tmp_path / "cache").exists() and a_file.read_text() == "x"


# ------------------------------------------------------------------------- a small real run

@pytest.fixture(scope="module")
def run_dir(dataset, analytic_model, tmp_path_factory):
    """One run with an --imgsz that is not a multiple of the stride (100 -> 128), parts of 2 images."""
    out = tmp_path_factory.mktemp("run") / "run"
    p = run_bulkdet("run", dataset, "--model", analytic_model, "--out", out, "--imgsz", 100, "--max-batch", 2,
                    "--commit-every", 2, "-q")
    assert p.returncode == 0, p.stderr
    return out, p


def test_imgsz_off_the_stride_is_rounded_up_with_one_warning(run_dir):
    out, p = run_dir
    warnings = [line for line in p.stderr.splitlines() if "not a multiple of the model's stride" in line]
    assert warnings == ["bulkdet: --imgsz 100 is not a multiple of the model's stride 32: using 128 "
                        "(as Ultralytics does)"], p.stderr
    assert json.loads((out / "run.json").read_text())["model"]["input_hw"] == [128, 128]


def test_report_on_a_run_with_a_truncated_part_says_which_and_what_to_do(cli, run_dir, tmp_path):
    import shutil

    out = shutil.copytree(run_dir[0], tmp_path / "run")
    part = sorted((out / "images").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    for args in ((), ("--json",), ("--html", tmp_path / "r.html")):
        r = cli("report", out, *args)
        assert r.exit_code == 1, r.output
        line = error_line(r)
        assert "cannot be read" in line and part.name in line and "run the same `bulkdet run` command" in line, line
    assert not (tmp_path / "r.html").exists()


def test_report_html_into_a_path_under_a_file_is_refused(cli, run_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r = cli("report", run_dir[0], "--html", tmp_path / "a-file" / "r.html")
    assert r.exit_code == 2 and "'--html'" in error_line(r), r.output


# --------------------------------------------------------------------- non-finite model outputs

def nan_for_dark_images(path):
    """A YOLOv8-layout model [B, 7, 1] whose every value is 1 + log(mean red - 0.5): NaN for an image
    whose red channel is dark on average; for a red one 0.31, a small box with a score over 0.25."""
    F = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gather", ["images", "red"], ["r"], axis=1),
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Sub", ["m", "half"], ["d"]),
        helper.make_node("Log", ["d"], ["l"]),
        helper.make_node("Add", ["l", "one"], ["v"]),
        helper.make_node("Reshape", ["v", "b11"], ["v3"]),
        helper.make_node("Expand", ["v3", "shape"], ["output0"]),
    ]
    inits = [helper.make_tensor("red", TensorProto.INT64, [1], [0]), helper.make_tensor("half", F, [], [0.5]),
             helper.make_tensor("one", F, [], [1.0]),
             helper.make_tensor("b11", TensorProto.INT64, [3], [-1, 1, 1]),
             helper.make_tensor("shape", TensorProto.INT64, [3], [1, 7, 1])]
    graph = helper.make_graph(nodes, "nan_for_dark", [helper.make_tensor_value_info("images", F, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output0", F, ["batch", 7, 1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": "{0: 'a', 1: 'b', 2: 'c'}", "stride": "32"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_non_finite_model_outputs_are_refused_as_errors_of_their_images(cli, tmp_path):
    from bulkdet.ingest.pack import pack

    (tmp_path / "src").mkdir()
    for name, colour in [("red1.png", (255, 0, 0)), ("dark.png", (0, 0, 0)), ("red2.png", (255, 40, 40))]:
        Image.new("RGB", (64, 64), colour).save(tmp_path / "src" / name)
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    model = nan_for_dark_images(tmp_path / "nan.onnx")
    r = cli("run", tmp_path / "ds", "--model", model, "--out", tmp_path / "run", "--imgsz", 64, "--max-batch", 4,
            "-q")
    assert r.exit_code == 3, r.output  # finished, one input failed
    rows = {row["path"]: row for row in read_images(tmp_path / "run").to_pylist()}
    assert rows["dark.png"]["status"] == "infer_error" and "NaN" in rows["dark.png"]["error"]
    assert rows["red1.png"]["status"] == rows["red2.png"]["status"] == "ok"  # same batch, kept
    detections = read_detections(tmp_path / "run")
    assert sorted(detections.column("path").to_pylist()) == ["red1.png", "red2.png"]
    for column in ("score", "x1", "y1", "x2", "y2"):
        assert pc.all(pc.is_finite(detections.column(column))).as_py(), column


def test_postprocess_refuses_inf_and_nan_per_image():
    good = yolov8_output([(10, 10, 50, 50)], [0], [0.9], nc=2)
    bad_score, bad_box = good.copy(), good.copy()
    bad_score[0, 4, 0] = np.inf
    bad_box[0, 0, 3] = np.nan  # an anchor below the threshold: still a broken output
    out = np.concatenate([good, bad_score, bad_box])
    dets = postprocess([out], batch_of([(640, 640)] * 3), "yolov8", conf=0.25, iou=0.45, max_det=300)
    assert len(dets[0]) == 1 and dets[0].error is None
    assert len(dets[1]) == 0 and "0 NaN and 1 inf" in dets[1].error
    assert len(dets[2]) == 0 and "1 NaN and 0 inf" in dets[2].error


# ------------------------------------------------------------- native output, unexpected errors

@pytest.mark.slow
def test_quiet_silences_dalis_own_error_lines(analytic_model, tmp_path):
    from bulkdet.ingest.pack import pack

    make_images(tmp_path / "src", SPECS[:2])
    good = (tmp_path / "src" / "img_1.jpg").read_bytes()
    (tmp_path / "src" / "cut.jpg").write_bytes(good[: len(good) // 2])  # DALI prints "[ERROR] ..." for it
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    loud = run_bulkdet("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "a", "--imgsz", 128)
    quiet = run_bulkdet("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "b", "--imgsz", 128,
                        "-q")
    assert loud.returncode == quiet.returncode == 3, (loud.stderr, quiet.stderr)
    assert "[ERROR]" in loud.stderr  # what -q has to silence is there without it
    assert "[ERROR]" not in quiet.stderr and "Corrupt JPEG" not in quiet.stderr, quiet.stderr
    assert "1 input(s) failed" in quiet.stdout


def test_an_unexpected_error_is_one_line_and_the_traceback_comes_with_debug(cli, monkeypatch):
    import bulkdet.system.info

    def broken():
        raise KeyError("a bug")

    monkeypatch.setattr(bulkdet.system.info, "print_info", broken)
    r = cli("info")
    assert r.exit_code == 1, r.output
    assert error_line(r) == "error: KeyError: 'a bug' (unexpected: `bulkdet --debug info ...` shows where)"
    with pytest.raises(KeyError, match="a bug"):
        cli("--debug", "info")


@pytest.mark.slow
def test_debug_shows_the_traceback_in_a_real_process(tmp_path):
    (tmp_path / "run.json").write_text("[]")  # JSON, but no run's: nothing was written for this case
    plain = run_bulkdet("report", tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stderr.startswith("error:") and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert "bulkdet --debug report" in plain.stderr
    debug = run_bulkdet("--debug", "report", tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr
