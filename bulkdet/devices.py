"""Which device and backend a run uses: `--device auto|cpu|gpu`, `--backend auto|onnxruntime|tensorrt`.

The GPU path needs four things; `probe()` checks each without starting any of them:
an NVIDIA driver that sees a GPU (libcuda), DALI's CUDA build seeing it (the "mixed" decoder),
cuda-python (`cuda.bindings`: the streams and device buffers between DALI and the engine), and a
backend: TensorRT (`tensorrt` module) or ONNX Runtime with its CUDA provider (onnxruntime-gpu).
`--device gpu` without one of them is an error naming what is missing; `--device auto` then
runs on the CPU and says why.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from bulkdet.engines import ENGINE_SUFFIXES

log = logging.getLogger("bulkdet")

DEVICES = ("auto", "cpu", "gpu")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
GPU_EXTRA = "pip install 'bulkdet[gpu]'"


class DeviceError(RuntimeError):
    """The device/backend asked for cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class GpuStatus:
    """What this machine has for the GPU path; `missing` maps a component to why it is unusable."""

    gpus: int = 0
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    onnxruntime_cuda: bool = False
    tensorrt: str | None = None  # version
    missing: dict = field(default_factory=dict)

    @property
    def base_ok(self) -> bool:
        """Driver, DALI CUDA and cuda-python: what every GPU backend needs."""
        return not {"driver", "dali", "cuda-python"} & set(self.missing)

    def backend_ok(self, backend: str) -> bool:
        return self.base_ok and (self.tensorrt is not None if backend == "tensorrt" else self.onnxruntime_cuda)

    def problems(self, backend: str | None) -> list[str]:
        """What is missing for the GPU with `backend` (None: with either backend)."""
        keys = ["driver", "dali", "cuda-python"]
        if backend == "tensorrt":
            keys.append("tensorrt")
        elif backend == "onnxruntime":
            keys.append("onnxruntime")
        elif not (self.tensorrt or self.onnxruntime_cuda):
            keys += ["tensorrt", "onnxruntime"]
        return [self.missing[k] for k in keys if k in self.missing]


@dataclass(frozen=True)
class Selection:
    device: str  # cpu | gpu
    backend: str  # onnxruntime | tensorrt
    reason: str  # why, when it was chosen automatically
    gpu_name: str | None = None


def _driver() -> tuple[int, str | None, tuple[int, int] | None, str | None]:
    """(GPU count, name of GPU 0, its compute capability, problem) from the CUDA driver API."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, None, None, "no NVIDIA driver (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return 0, None, None, "the NVIDIA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, None, None, "the NVIDIA driver sees no GPU"
    dev = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return count.value, name.value.decode(errors="replace"), (major.value, minor.value), None


def probe() -> GpuStatus:
    """Check every part of the GPU path on this machine (cheap: nothing is started)."""
    missing = {}
    gpus, name, cc, problem = _driver()
    if problem:
        missing["driver"] = problem
    try:
        from nvidia.dali import backend as dali_backend

        if not problem and dali_backend.GetCUDADeviceCount() < 1:
            missing["dali"] = "DALI's CUDA build sees no GPU (check nvidia-dali-cuda120 against the driver)"
    except Exception as exc:  # noqa: BLE001 - any failure means no DALI GPU decoding
        missing["dali"] = f"DALI with CUDA is not usable ({exc})"
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        missing["cuda-python"] = "no cuda-python (cuda.bindings) module"
    import onnxruntime

    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if not ort_cuda:
        missing["onnxruntime"] = "onnxruntime has no CUDA provider (this is the CPU build, not onnxruntime-gpu)"
    trt_version = None
    if importlib.util.find_spec("tensorrt") is None:
        missing["tensorrt"] = "no tensorrt module"
    else:
        try:
            import tensorrt

            trt_version = tensorrt.__version__
        except Exception as exc:  # noqa: BLE001 - a broken install is a missing one
            missing["tensorrt"] = f"the tensorrt module does not load ({exc})"
    return GpuStatus(gpus, name, cc, ort_cuda, trt_version, missing)


def select(device: str = "auto", backend: str = "auto", model: Path | None = None,
           status: GpuStatus | None = None) -> Selection:
    """Resolve auto choices; DeviceError names what is missing for an explicit GPU request."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_engine = model is not None and Path(model).suffix in ENGINE_SUFFIXES
    if is_engine and backend == "onnxruntime":
        raise DeviceError(f"{model} is a TensorRT engine: it runs with --backend tensorrt only")
    if is_engine:
        backend = "tensorrt"
    if device == "cpu":
        if backend == "tensorrt":
            raise DeviceError("TensorRT runs on the GPU only: use --device gpu, or --backend onnxruntime on the CPU")
        return Selection("cpu", "onnxruntime", "asked for the CPU")
    if status is None:
        status = probe()
    wanted = None if backend == "auto" else backend
    if wanted is None:  # TensorRT when it is there: it is the faster of the two
        wanted = "tensorrt" if status.backend_ok("tensorrt") else "onnxruntime" if status.backend_ok(
            "onnxruntime") else None
    if wanted and status.backend_ok(wanted):
        why = "asked for the GPU" if device == "gpu" else "a usable GPU was found"
        return Selection("gpu", wanted, why, status.gpu_name)
    problems = status.problems(None if backend == "auto" else backend)
    missing = "; ".join(problems)
    if any(k in status.missing and status.missing[k] in problems for k in ("cuda-python", "tensorrt", "onnxruntime")):
        missing += f" ({GPU_EXTRA} installs them)"
    if device == "gpu" or backend == "tensorrt":
        what = "--device gpu" if device == "gpu" else f"--backend tensorrt{' (for an engine file)' * is_engine}"
        raise DeviceError(f"{what}: no usable GPU path: {missing}")
    log.info("no usable GPU path (%s): running on the CPU", missing)
    return Selection("cpu", "onnxruntime", f"no usable GPU path: {missing}")
