"""`bulkdet info`: versions and providers as the libraries report them, and why a backend is missing."""

from __future__ import annotations

import importlib.util
import json

import nvidia.dali
import onnxruntime as ort
import pytest

from bulkdet.system.info import probe

HAS_GPU_EP = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _backend(p: dict, name: str) -> dict:
    return next(b for b in p["backends"] if b["name"].startswith(name))


def test_probe_reports_what_the_libraries_say():
    p = probe()
    assert p["dali"]["version"] == nvidia.dali.__version__
    assert p["dali"]["devices"][0] == "cpu"
    assert p["onnxruntime"]["version"] == ort.__version__
    assert p["onnxruntime"]["providers"] == ort.get_available_providers()
    cpu = _backend(p, "onnxruntime on cpu")
    assert cpu["available"] and cpu["why_not"] is None
    assert _backend(p, "dali decode on cpu")["available"]
    for b in p["backends"]:  # every unavailable backend says why
        assert b["available"] or b["why_not"], b


def test_probe_says_why_gpu_backends_are_unavailable():
    p = probe()
    if not HAS_GPU_EP:
        why = _backend(p, "onnxruntime on gpu")["why_not"]
        assert "not in this onnxruntime build" in why and "pip install bulkdet[gpu]" in why
        assert "CUDAExecutionProvider" in p["onnxruntime"]["unavailable"]
    if not HAS_TENSORRT:
        assert p["tensorrt"] == {"version": None, "error": "not installed (pip install bulkdet[gpu])"}
        assert not _backend(p, "tensorrt")["available"]
    if not p["gpu"]["gpus"]:
        assert p["gpu"]["error"]  # e.g. "no NVIDIA driver (libnvidia-ml.so not found)"
        mixed = _backend(p, "dali decode on gpu")
        assert not mixed["available"] and "no GPU" in mixed["why_not"]
        assert p["dali"]["devices"] == ["cpu"]


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
    assert json.loads(r.output)["onnxruntime"]["providers"] == ort.get_available_providers()


@pytest.mark.gpu
def test_info_lists_the_gpu_with_name_and_memory():
    p = probe()
    assert p["gpu"]["gpus"], p["gpu"]["error"]
    g = p["gpu"]["gpus"][0]
    assert g["name"] and g["memory_total_gib"] > 0
    assert "gpu:0" in p["dali"]["devices"]
