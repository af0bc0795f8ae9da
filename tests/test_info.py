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


def test_probe_says_whether_each_gpu_part_is_usable_and_why_not():
    """On any machine: each GPU part is usable, or unusable for the reason that holds here."""
    p = probe()
    gpus = p["gpu"]["gpus"]
    assert bool(gpus) != bool(p["gpu"]["error"]), p["gpu"]  # GPUs listed, or why none: one of the two
    assert p["dali"]["devices"][1:] == [f"gpu:{i}" for i in range(len(p["dali"]["devices"]) - 1)]
    mixed = _backend(p, "dali decode on gpu")
    assert mixed["available"] == (len(p["dali"]["devices"]) > 1)
    if not gpus:
        assert not mixed["available"] and "no GPU" in mixed["why_not"]

    ort_gpu = _backend(p, "onnxruntime on gpu")
    assert ort_gpu["available"] == ("CUDAExecutionProvider" not in p["onnxruntime"]["unavailable"])
    if not HAS_GPU_EP:
        why = ort_gpu["why_not"]
        assert "not in this onnxruntime build" in why and "pip install bulkdet[gpu]" in why
    elif not gpus:
        assert ort_gpu["why_not"] == "in this build, but no GPU found"
    else:  # a one-node session on the CUDA provider decides
        assert ort_gpu["available"] or ort_gpu["why_not"].startswith("listed, but")

    trt = _backend(p, "tensorrt")
    if not HAS_TENSORRT:
        assert p["tensorrt"] == {"version": None, "error": "not installed (pip install bulkdet[gpu])"}
        assert not trt["available"]
    elif not gpus:
        assert p["tensorrt"]["error"] == "installed, but no GPU found" and not trt["available"]
    else:
        assert trt["available"] == (p["tensorrt"]["error"] is None and p["cuda_python"]["version"] is not None)


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
