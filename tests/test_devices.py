"""Device and backend selection, its error messages, and the CPU half of the engine interface."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import gpu_status, make_images

from bulkdet.system.devices import DeviceError, GpuStatus, select
from bulkdet.engines import create_engine

GPU_OK = GpuStatus(gpus=1, gpu_name="NVIDIA H100", compute_capability=(9, 0), onnxruntime_cuda=True,
                   tensorrt="10.9.0")
NO_DRIVER = GpuStatus(missing={"driver": "no NVIDIA driver (libcuda.so.1 not found)",
                               "onnxruntime": "onnxruntime has no CUDA provider", "tensorrt": "no tensorrt module"})
HERE = gpu_status()  # devices.probe() on this machine


def _without(status: GpuStatus, **missing) -> GpuStatus:
    fields = dict(status.__dict__, missing={**status.missing, **missing})
    if "tensorrt" in missing:
        fields["tensorrt"] = None
    if "onnxruntime" in missing:
        fields["onnxruntime_cuda"] = False
    return GpuStatus(**fields)


def _pair(selection):
    return selection.device, selection.backend


def test_auto_prefers_tensorrt_then_onnxruntime_cuda_then_cpu():
    assert _pair(select("auto", "auto", status=GPU_OK)) == ("gpu", "tensorrt")
    no_trt = _without(GPU_OK, tensorrt="no tensorrt module")
    assert _pair(select("auto", "auto", status=no_trt)) == ("gpu", "onnxruntime")
    cpu = select("auto", "auto", status=NO_DRIVER)
    assert _pair(cpu) == ("cpu", "onnxruntime") and "no NVIDIA driver" in cpu.reason
    assert _pair(select("cpu", "auto", status=GPU_OK)) == ("cpu", "onnxruntime")


@pytest.mark.parametrize("missing, backend, expected", [
    ({"driver": "no NVIDIA driver (libcuda.so.1 not found)"}, "auto", "no NVIDIA driver"),
    ({"dali": "DALI's CUDA build sees no GPU"}, "auto", "DALI"),
    ({"cuda-python": "no cuda-python (cuda.bindings) module"}, "onnxruntime", "cuda-python"),
    ({"onnxruntime": "onnxruntime has no CUDA provider"}, "onnxruntime", "no CUDA provider"),
    ({"tensorrt": "no tensorrt module"}, "tensorrt", "no tensorrt module"),
])
def test_gpu_request_names_what_is_missing(missing, backend, expected):
    status = _without(GPU_OK, **missing)
    with pytest.raises(DeviceError, match=expected) as err:
        select("gpu", backend, status=status)
    assert "--device gpu" in str(err.value)


def test_auto_backend_on_gpu_lists_both_backends_when_neither_is_there():
    status = _without(GPU_OK, tensorrt="no tensorrt module", onnxruntime="onnxruntime has no CUDA provider")
    with pytest.raises(DeviceError) as err:
        select("gpu", "auto", status=status)
    assert "no tensorrt module" in str(err.value) and "no CUDA provider" in str(err.value)
    assert "bulkdet[gpu]" in str(err.value)


def test_combinations_that_cannot_work(tmp_path):
    with pytest.raises(DeviceError, match="GPU only"):
        select("cpu", "tensorrt", status=GPU_OK)
    engine_file = tmp_path / "model.engine"
    with pytest.raises(DeviceError, match="backend tensorrt only"):
        select("auto", "onnxruntime", engine_file, status=GPU_OK)
    assert _pair(select("auto", "auto", engine_file, status=GPU_OK)) == ("gpu", "tensorrt")
    with pytest.raises(DeviceError, match="engine file"):  # an engine cannot fall back to the CPU
        select("auto", "auto", engine_file, status=NO_DRIVER)
    with pytest.raises(ValueError, match="--device"):
        select("tpu", "auto", status=GPU_OK)


def test_probe_agrees_with_this_machine():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert not HERE.onnxruntime_cuda and "onnxruntime" in HERE.missing
    assert ("onnxruntime" in HERE.missing) != HERE.onnxruntime_cuda
    assert ("driver" in HERE.missing) == (HERE.gpus == 0)
    assert select("cpu", "auto", status=HERE).device == "cpu"


@pytest.mark.skipif(HERE.backend_ok("onnxruntime") or HERE.backend_ok("tensorrt"),
                    reason="this machine has a usable GPU path")
def test_run_device_gpu_without_gpu_fails_clearly_and_auto_falls_back(tmp_path, analytic_model, cli):
    make_images(tmp_path / "src", [("a.jpg", 120, 90, "jpeg", 1)])
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "--device", "gpu", "-q")
    assert r.exit_code == 1 and "no usable GPU path" in r.output
    assert next(iter(HERE.problems(None))) in r.output
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run2", "-q")
    assert r.exit_code == 0, r.output
    selection = json.loads((tmp_path / "run2" / "run.json").read_text())["device_selection"]
    assert selection["device"] == "cpu" and "no usable GPU path" in selection["reason"]


@pytest.mark.skipif(HERE.base_ok, reason="DALI can decode on this machine's GPU")
def test_run_and_crops_refuse_device_gpu_alike(tmp_path, analytic_model, cli):
    """`--device gpu` without a usable GPU: the same exit code and the same form of line for both
    commands, naming what each lacks (crops decodes only: no backend needed), nothing written."""
    make_images(tmp_path / "src", [("a.jpg", 120, 90, "jpeg", 1)])
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    assert cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "cpu-run", "-q").exit_code == 0
    run = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "--device", "gpu", "-q")
    crops = cli("crops", tmp_path / "cpu-run", "--out", tmp_path / "crops", "--device", "gpu", "-q")
    assert run.exit_code == crops.exit_code == 1, (run.output, crops.output)
    prefix = "error: --device gpu: no usable GPU path: "
    assert run.output.startswith(prefix) and run.output.count("\n") == 1, run.output
    assert all(problem in run.output for problem in HERE.problems(None))
    assert crops.output == f"{prefix}{'; '.join(HERE.problems('decode'))}\n", crops.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "crops").exists()


def test_onnxruntime_binds_input_by_pointer(analytic_model):
    """The IOBinding call the CUDA path makes, exercised with a host pointer."""
    engine = create_engine("onnxruntime", analytic_model)
    x = np.zeros((2, 3, 64, 96), np.float32)
    x[:, 0, 8:20, 10:40] = 1.0
    assert engine.stage(x) is x and engine.input_dtype == np.float32  # CPU: no hand-off
    bound = engine.run_bound(x.ctypes.data, x.shape, x.dtype, "cpu")
    np.testing.assert_array_equal(bound[0], engine.infer(x)[0])
    assert bound[0][0, :4, 0].tolist() == [25.0, 14.0, 30.0, 12.0]  # cx, cy, w, h of the red box
    engine.close()
