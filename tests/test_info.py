"""`bulkdet info`: versions and providers as the libraries report them, and why a backend is missing."""

from __future__ import annotations

import importlib.util
import json

import nvidia.dali
import onnxruntime as ort
import pytest

from bulkdet.system.info import Library, probe_machine

HAS_GPU_EP = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_probe_reports_what_the_libraries_say():
    m = probe_machine()
    assert m.dali.version == nvidia.dali.__version__
    assert m.dali.devices[0] == "cpu"
    assert m.onnxruntime.version == ort.__version__
    assert m.onnxruntime.providers == ort.get_available_providers()
    assert m.backends.onnxruntime_cpu.available and m.backends.onnxruntime_cpu.why_not is None
    assert m.backends.dali_cpu.available
    for b in m.backends:  # every unavailable backend says why, and an available one gives no reason
        assert b.available != bool(b.why_not), b
    assert [b.name for b in m.backends] == ["onnxruntime on cpu", "onnxruntime on gpu (CUDAExecutionProvider)",
                                            "tensorrt", "dali decode on cpu", "dali decode on gpu (mixed)"]


def test_probe_says_whether_each_gpu_part_is_usable_and_why_not():
    """On any machine: each GPU part is usable, or unusable for the reason that holds here."""
    m = probe_machine()
    gpus = m.gpu.gpus
    assert bool(gpus) != bool(m.gpu.error), m.gpu  # GPUs listed, or why none: one of the two
    assert m.dali.devices[1:] == [f"gpu:{i}" for i in range(len(m.dali.devices) - 1)]
    mixed = m.backends.dali_gpu
    assert mixed.available == (len(m.dali.devices) > 1)
    if not gpus:
        assert not mixed.available and "no GPU" in mixed.why_not

    ort_gpu = m.backends.onnxruntime_gpu
    assert ort_gpu.available == ("CUDAExecutionProvider" not in m.onnxruntime.unavailable)
    if not HAS_GPU_EP:
        assert "not in this onnxruntime build" in ort_gpu.why_not and "pip install bulkdet[gpu]" in ort_gpu.why_not
    elif not gpus:
        assert ort_gpu.why_not == "in this build, but no GPU found"
    else:  # a one-node session on the CUDA provider decides
        assert ort_gpu.available or ort_gpu.why_not.startswith("listed, but")

    trt = m.backends.tensorrt
    if not HAS_TENSORRT:
        assert m.tensorrt == Library(None, "not installed (pip install bulkdet[gpu])")
        assert not trt.available
    elif not gpus:
        assert m.tensorrt.error == "installed, but no GPU found" and not trt.available
    else:
        assert trt.available == (m.tensorrt.error is None and m.cuda_python.version is not None)


def test_cli_info_prints_versions_and_reasons(cli):
    r = cli("info")
    assert r.exit_code == 0
    assert "DALI" in r.output and nvidia.dali.__version__ in r.output
    assert ort.__version__ in r.output and "CPUExecutionProvider" in r.output
    assert "what bulkdet can use here" in r.output
    if not HAS_TENSORRT:
        assert "pip install bulkdet[gpu]" in r.output  # rich markup must not eat "[gpu]"
    r = cli("info", "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert data["onnxruntime"]["providers"] == ort.get_available_providers()
    assert data["dali"]["version"] == nvidia.dali.__version__ and data["dali"]["devices"][0] == "cpu"
    assert data["tensorrt"].keys() == {"version", "error"}
    backends = {b["name"]: b for b in data["backends"]}  # a list of rows, as `bulkdet info` shows them
    assert backends["onnxruntime on cpu"] == {"name": "onnxruntime on cpu", "available": True, "why_not": None}
    assert len(backends) == 5 and all(b["available"] != bool(b["why_not"]) for b in backends.values())


@pytest.mark.gpu
def test_info_lists_the_gpu_with_name_and_memory():
    m = probe_machine()
    assert m.gpu.gpus, m.gpu.error
    g = m.gpu.gpus[0]
    assert g.name and g.memory_total_gib > 0
    assert "gpu:0" in m.dali.devices
