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
from dataclasses import asdict, dataclass, field, fields

from bulkdet import __version__

GPU_EXTRA = "pip install bulkdet[gpu]"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_gib: float
    memory_free_gib: float
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class Gpus:
    """GPUs as the driver lists them, or why none can be listed."""

    gpus: list[Gpu]
    error: str | None
    driver: str | None = None
    cuda_driver: str | None = None


@dataclass(frozen=True)
class Library:
    """A library as this machine has it."""

    version: str | None  # None: not installed, or not loadable
    error: str | None = None  # why bulkdet cannot use it (None: it can)


@dataclass(frozen=True)
class Dali(Library):
    build: str | None = None  # the DALI distribution installed, e.g. nvidia-dali-cuda120
    devices: list[str] = field(default_factory=list)
    mixed_decode: bool = False  # DALI can decode on the GPU
    mixed_decode_why_not: str | None = None


@dataclass(frozen=True)
class OnnxRuntime(Library):
    distribution: str | None = None  # onnxruntime or onnxruntime-gpu
    providers: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # GPU provider -> why it cannot run


@dataclass(frozen=True)
class Usable:
    """One backend or decode stage: can bulkdet use it here, and if not, why."""

    name: str  # as `bulkdet info` shows it
    available: bool
    why_not: str | None


@dataclass(frozen=True)
class Backends:
    """What `bulkdet info` lists under "what bulkdet can use here", one row per backend or decode stage."""

    onnxruntime_cpu: Usable
    onnxruntime_gpu: Usable
    tensorrt: Usable
    dali_cpu: Usable
    dali_gpu: Usable

    def __iter__(self):
        return (getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Machine:
    """Everything `bulkdet info` shows."""

    bulkdet: str
    python: str
    platform: str
    cpu_count: int | None
    gpu: Gpus
    dali: Dali
    onnxruntime: OnnxRuntime
    tensorrt: Library
    cuda_python: Library
    backends: Backends

    def as_dict(self) -> dict:
        """Plain data: the --json output (`backends` a list, in the order shown)."""
        return {**asdict(self), "backends": [asdict(b) for b in self.backends]}


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_gpus() -> Gpus:
    """GPUs as the driver sees them: name, memory; or why none can be listed."""
    try:
        import pynvml
    except ImportError:
        return Gpus([], "nvidia-ml-py not installed, GPUs cannot be listed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return Gpus([], "no NVIDIA driver (libnvidia-ml.so not found)")
    except pynvml.NVMLError as exc:
        return Gpus([], f"NVIDIA driver present but not usable: {exc}")
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(Gpu(i, _text(pynvml.nvmlDeviceGetName(h)), round(mem.total / 2**30, 1),
                            round(mem.free / 2**30, 1), f"{major}.{minor}"))
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return Gpus(gpus, None if gpus else "NVIDIA driver loaded, but it lists no GPU",
                    _text(pynvml.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}")
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_dali(n_gpus: int) -> Dali:
    try:
        import nvidia.dali
        import nvidia.dali.backend as dali_backend
    except ImportError as exc:
        return Dali(None, f"not installed or not loadable: {exc}")
    builds = [d for d in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110") if _dist_version(d)]
    try:
        visible = int(dali_backend.GetCUDADeviceCount())
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        visible = 0
        why = f"DALI cannot query CUDA: {exc}"
    else:
        why = None if visible else ("no GPU visible to DALI" + ("" if n_gpus else " (no NVIDIA driver / GPU)"))
    return Dali(nvidia.dali.__version__, build=builds[0] if builds else None,
                devices=["cpu"] + [f"gpu:{i}" for i in range(visible)],
                mixed_decode=visible > 0, mixed_decode_why_not=why)


def probe_onnxruntime(n_gpus: int) -> OnnxRuntime:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return OnnxRuntime(None, f"not installed or not loadable: {exc}")
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
    return OnnxRuntime(ort.__version__, distribution=dist, providers=providers,
                       unavailable={k: v for k, v in why.items() if v})


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


def probe_tensorrt(n_gpus: int) -> Library:
    try:
        import tensorrt
    except ImportError:
        return Library(None, f"not installed ({GPU_EXTRA})")
    except Exception as exc:  # noqa: BLE001 - e.g. libnvinfer missing
        return Library(None, f"installed but not loadable: {exc}")
    return Library(tensorrt.__version__, None if n_gpus else "installed, but no GPU found")


def probe_cuda_python() -> Library:
    version = _dist_version("cuda-bindings") or _dist_version("cuda-python")
    return Library(version, None if version else f"not installed ({GPU_EXTRA})")


def _usable(name: str, why_not: str | None) -> Usable:
    return Usable(name, why_not is None, why_not)


def probe_machine() -> Machine:
    """Every library and device that bulkdet can use here, and why not where it cannot."""
    gpu = probe_gpus()
    n_gpus = len(gpu.gpus)
    dali = probe_dali(n_gpus)
    ort = probe_onnxruntime(n_gpus)
    trt = probe_tensorrt(n_gpus)
    cuda_python = probe_cuda_python()
    ort_cpu_why = None if "CPUExecutionProvider" in ort.providers else ort.error or "no CPU provider"
    ort_gpu_why = ort.unavailable.get("CUDAExecutionProvider", ort.error)
    trt_why = trt.error or (None if cuda_python.version else f"needs cuda-python: {cuda_python.error}")
    dali_gpu_why = dali.error or dali.mixed_decode_why_not
    backends = Backends(
        onnxruntime_cpu=_usable("onnxruntime on cpu", ort_cpu_why),
        onnxruntime_gpu=_usable("onnxruntime on gpu (CUDAExecutionProvider)", ort_gpu_why),
        tensorrt=_usable("tensorrt", trt_why),
        dali_cpu=_usable("dali decode on cpu", dali.error if dali.version is None else None),
        dali_gpu=_usable("dali decode on gpu (mixed)", dali_gpu_why),
    )
    return Machine(__version__, sys.version.split()[0], platform.platform(), os.cpu_count(), gpu, dali, ort,
                   trt, cuda_python, backends)


def probe() -> dict:
    """Everything `bulkdet info` shows, as plain data (its --json output)."""
    return probe_machine().as_dict()


def print_info(console=None) -> Machine:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    m = probe_machine()
    console.print(f"bulkdet {m.bulkdet} · Python {m.python} · {m.platform} · {m.cpu_count} CPU cores", markup=False)
    for g in m.gpu.gpus:
        console.print(f"GPU {g.index}: {g.name}, {g.memory_total_gib} GiB ({g.memory_free_gib} GiB free), "
                      f"compute capability {g.compute_capability}; driver {m.gpu.driver}, "
                      f"CUDA {m.gpu.cuda_driver}", markup=False)
    if not m.gpu.gpus:
        console.print(f"GPU: none: {m.gpu.error}", markup=False)
    dali, ort = m.dali, m.onnxruntime
    t = Table(title="libraries", title_justify="left")
    for col in ("library", "version", "details"):
        t.add_column(col)
    rows = [("DALI", dali.version, dali.error or f"{dali.build}; devices: {', '.join(dali.devices)}"),
            ("ONNX Runtime", ort.version, ort.error or f"{ort.distribution}; providers: {', '.join(ort.providers)}"),
            ("TensorRT", m.tensorrt.version, m.tensorrt.error),
            ("cuda-python", m.cuda_python.version, m.cuda_python.error)]
    for name, version, details in rows:
        t.add_row(name, escape(version or "-"), escape(details or ""))
    console.print(t)
    t = Table(title="what bulkdet can use here", title_justify="left")
    for col in ("backend / stage", "usable", "why not"):
        t.add_column(col)
    for b in m.backends:
        t.add_row(b.name, "[green]yes[/green]" if b.available else "[red]no[/red]", escape(b.why_not or ""))
    console.print(t)
    return m
