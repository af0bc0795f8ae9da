"""Which device and backend a run uses: `--device auto|cpu|gpu`, `--backend auto|onnxruntime|tensorrt`.

The GPU path needs four things; `probe()` checks each (with `bulkdet info`'s probes):
an NVIDIA driver that sees a GPU, DALI's CUDA build seeing it (the "mixed" decoder),
cuda-python (`cuda.bindings`: the streams and device buffers between DALI and the engine), and a
backend: TensorRT (`tensorrt` module) or ONNX Runtime with its CUDA provider (onnxruntime-gpu).
`--device gpu` without one of them is an error naming what is missing; `--device auto` then
runs on the CPU and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from bulkdet.choices import Backend, Device
from bulkdet.model.info import is_engine_file
from bulkdet.system.info import GPU_EXTRA, probe_machine

log = logging.getLogger("bulkdet")


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
        """What is missing for the GPU with `backend` (None: with either backend; "decode": DALI's
        GPU decoder alone, for a decode-only command)."""
        if backend == "decode":
            return [self.missing[k] for k in ("driver", "dali") if k in self.missing]
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


def probe() -> GpuStatus:
    """Every part of the GPU path on this machine, from `bulkdet info`'s probes (NVML for the GPUs,
    a one-node session for ONNX Runtime's CUDA provider, imports for the rest)."""
    found = probe_machine()
    gpus, usable, trt = found.gpu.gpus, found.backends, found.tensorrt
    missing = {}
    if not gpus:
        missing["driver"] = found.gpu.error or "no GPU"
    if gpus and not usable.dali_gpu.available:
        missing["dali"] = f"DALI cannot decode on the GPU: {usable.dali_gpu.why_not}"
    if not found.cuda_python.version:
        missing["cuda-python"] = "no cuda-python (cuda.bindings)"
    if not usable.onnxruntime_gpu.available:
        missing["onnxruntime"] = f"onnxruntime's CUDA provider: {usable.onnxruntime_gpu.why_not}"
    if not trt.version or trt.error:
        missing["tensorrt"] = f"TensorRT: {trt.error}"
    first = gpus[0] if gpus else None
    cc = tuple(int(v) for v in first.compute_capability.split(".")) if first else None
    return GpuStatus(len(gpus), first.name if first else None, cc, usable.onnxruntime_gpu.available,
                     trt.version if not trt.error else None, missing)


def select(device: str = "auto", backend: str = "auto", model: Path | None = None,
           status: GpuStatus | None = None) -> Selection:
    """Resolve auto choices; DeviceError names what is missing for an explicit GPU request."""
    device, backend = Device.parse(device, "--device").value, Backend.parse(backend, "--backend").value
    is_engine = model is not None and is_engine_file(model)
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
    if GPU_EXTRA not in missing and any(status.missing.get(k) in problems for k in ("cuda-python", "tensorrt")):
        missing += f" ({GPU_EXTRA} installs them)"
    if device == "gpu" or backend == "tensorrt":
        what = "--device gpu" if device == "gpu" else f"--backend tensorrt{' (for an engine file)' * is_engine}"
        raise no_gpu_path(what, missing)
    log.info("no usable GPU path (%s): running on the CPU", missing)
    return Selection("cpu", "onnxruntime", f"no usable GPU path: {missing}")


def no_gpu_path(what: str, missing: str) -> DeviceError:
    """The one error of a GPU asked for (`what`: the option) that can't be used here: exit code 1."""
    return DeviceError(f"{what}: no usable GPU path: {missing}")


def decode_device(device: str = "auto", status: GpuStatus | None = None) -> str:
    """Where a decode-only command (`crops`) decodes: it needs DALI's GPU decoder, no backend.
    auto: the GPU when DALI can decode there; gpu without it is the DeviceError `select` raises."""
    device = Device.parse(device, "--device").value
    if device == "cpu":
        return "cpu"
    missing = "; ".join((status or probe()).problems("decode"))
    if not missing:
        return "gpu"
    if device == "gpu":
        raise no_gpu_path("--device gpu", missing)
    log.info("no usable GPU path (%s): decoding on the CPU", missing)
    return "cpu"
