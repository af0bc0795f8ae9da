"""`bulkdet info`: what this machine can do, and why a backend is unavailable when it is.

Each probe imports or asks the real library and reports what it said; nothing is assumed
from package names alone. GPUs are listed through NVML (nvidia-ml-py, NVIDIA's own binding to
the driver's management library), which needs only the driver, not a CUDA toolkit.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys

from bulkdet import __version__

GPU_EXTRA = "pip install bulkdet[gpu]"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_gpus() -> dict:
    """GPUs as the driver sees them: name, memory; or why none can be listed."""
    try:
        import pynvml
    except ImportError:
        return {"gpus": [], "error": "nvidia-ml-py not installed, GPUs cannot be listed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return {"gpus": [], "error": "no NVIDIA driver (libnvidia-ml.so not found)"}
    except pynvml.NVMLError as exc:
        return {"gpus": [], "error": f"NVIDIA driver present but not usable: {exc}"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append({"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)),
                         "memory_total_gib": round(mem.total / 2**30, 1), "memory_free_gib": round(mem.free / 2**30, 1),
                         "compute_capability": f"{major}.{minor}"})
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return {"gpus": gpus, "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}",
                "error": None if gpus else "NVIDIA driver loaded, but it lists no GPU"}
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_dali(n_gpus: int) -> dict:
    try:
        import nvidia.dali
        import nvidia.dali.backend as dali_backend
    except ImportError as exc:
        return {"version": None, "error": f"not installed or not loadable: {exc}"}
    builds = [d for d in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110") if _dist_version(d)]
    try:
        visible = int(dali_backend.GetCUDADeviceCount())
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        visible = 0
        why = f"DALI cannot query CUDA: {exc}"
    else:
        why = None if visible else ("no GPU visible to DALI" + ("" if n_gpus else " (no NVIDIA driver / GPU)"))
    return {"version": nvidia.dali.__version__, "build": builds[0] if builds else None,
            "devices": ["cpu"] + [f"gpu:{i}" for i in range(visible)],
            "mixed_decode": visible > 0, "mixed_decode_why_not": why}


def probe_onnxruntime(n_gpus: int) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"version": None, "error": f"not installed or not loadable: {exc}"}
    providers = ort.get_available_providers()
    dist = "onnxruntime-gpu" if _dist_version("onnxruntime-gpu") else "onnxruntime"
    why = {}
    for ep in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if ep not in providers:
            why[ep] = f"not in this onnxruntime build ({dist} {ort.__version__}; {GPU_EXTRA} installs onnxruntime-gpu)"
        elif not n_gpus:
            why[ep] = "in this build, but no GPU found"
        else:
            why[ep] = _session_check(ort, ep)
    return {"version": ort.__version__, "distribution": dist, "providers": providers,
            "unavailable": {k: v for k, v in why.items() if v}}


def _session_check(ort, provider: str) -> str | None:
    """Create a one-node session on `provider`: the only honest test that its libraries load."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"listed, but a session cannot be created: {exc}"
    if provider not in sess.get_providers():
        return "listed, but it did not load (missing CUDA / cuDNN / TensorRT libraries?); see ONNX Runtime's log"
    return None


def probe_tensorrt(n_gpus: int) -> dict:
    try:
        import tensorrt
    except ImportError:
        return {"version": None, "error": f"not installed ({GPU_EXTRA})"}
    except Exception as exc:  # noqa: BLE001 - e.g. libnvinfer missing
        return {"version": None, "error": f"installed but not loadable: {exc}"}
    return {"version": tensorrt.__version__, "error": None if n_gpus else "installed, but no GPU found"}


def probe_cuda_python() -> dict:
    version = _dist_version("cuda-bindings") or _dist_version("cuda-python")
    return {"version": version, "error": None if version else f"not installed ({GPU_EXTRA})"}


def probe() -> dict:
    """Everything `bulkdet info` shows, as plain data (also its --json output)."""
    gpu = probe_gpus()
    n_gpus = len(gpu["gpus"])
    dali = probe_dali(n_gpus)
    ort = probe_onnxruntime(n_gpus)
    trt = probe_tensorrt(n_gpus)
    cuda_python = probe_cuda_python()
    ort_cpu_why = None if "CPUExecutionProvider" in ort.get("providers", []) else ort.get("error", "no CPU provider")
    trt_why = trt["error"] or (None if cuda_python["version"] else f"needs cuda-python: {cuda_python['error']}")
    backends = [
        {"name": "onnxruntime on cpu", "available": ort_cpu_why is None, "why_not": ort_cpu_why},
        {"name": "onnxruntime on gpu (CUDAExecutionProvider)",
         "available": "CUDAExecutionProvider" in ort.get("providers", []) and not ort.get("unavailable", {}).get(
             "CUDAExecutionProvider"),
         "why_not": ort.get("unavailable", {}).get("CUDAExecutionProvider", ort.get("error"))},
        {"name": "tensorrt", "available": trt_why is None, "why_not": trt_why},
        {"name": "dali decode on cpu", "available": dali.get("version") is not None, "why_not": dali.get("error")},
        {"name": "dali decode on gpu (mixed)", "available": bool(dali.get("mixed_decode")),
         "why_not": dali.get("mixed_decode_why_not", dali.get("error"))},
    ]
    for b in backends:
        if b["available"]:
            b["why_not"] = None
    return {"bulkdet": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "gpu": gpu, "dali": dali, "onnxruntime": ort, "tensorrt": trt,
            "cuda_python": cuda_python, "backends": backends}


def print_info(console=None) -> dict:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    p = probe()
    console.print(f"bulkdet {p['bulkdet']} · Python {p['python']} · {p['platform']} · {p['cpu_count']} CPU cores",
                  markup=False)
    gpu = p["gpu"]
    if gpu["gpus"]:
        for g in gpu["gpus"]:
            console.print(f"GPU {g['index']}: {g['name']}, {g['memory_total_gib']} GiB ({g['memory_free_gib']} GiB free), "
                          f"compute capability {g['compute_capability']}; driver {gpu['driver']}, "
                          f"CUDA {gpu['cuda_driver']}", markup=False)
    else:
        console.print(f"GPU: none: {gpu['error']}", markup=False)
    dali, ort, trt = p["dali"], p["onnxruntime"], p["tensorrt"]
    t = Table(title="libraries", title_justify="left")
    for col in ("library", "version", "details"):
        t.add_column(col)
    rows = [("DALI", dali.get("version"),
             dali.get("error") or f"{dali.get('build')}; devices: {', '.join(dali['devices'])}"),
            ("ONNX Runtime", ort.get("version"),
             ort.get("error") or f"{ort['distribution']}; providers: {', '.join(ort['providers'])}"),
            ("TensorRT", trt.get("version"), trt.get("error")),
            ("cuda-python", p["cuda_python"].get("version"), p["cuda_python"].get("error"))]
    for name, version, details in rows:
        t.add_row(name, escape(version or "-"), escape(details or ""))
    console.print(t)
    t = Table(title="what bulkdet can use here", title_justify="left")
    for col in ("backend / stage", "usable", "why not"):
        t.add_column(col)
    for b in p["backends"]:
        t.add_row(b["name"], "[green]yes[/green]" if b["available"] else "[red]no[/red]", escape(b["why_not"] or ""))
    console.print(t)
    return p
