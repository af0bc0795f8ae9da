"""The fixed choices of the command line, shared by the CLI (its --help and its checks) and the code
that acts on them: one home for the names `--device`, `--backend`, `--precision`, `--target` take."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str Enum that prints as its value: "cpu", not "Device.CPU" (f-strings, JSON, run.json)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: str, option: str):
        """The member named `value`; ValueError naming the option and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{option} {value!r} is not one of {', '.join(m.value for m in cls)}") from None


class Device(Choice):
    AUTO = "auto"  # the GPU when its whole path is usable, else the CPU (and the log says why)
    CPU = "cpu"
    GPU = "gpu"


class Backend(Choice):
    AUTO = "auto"  # TensorRT when usable on the GPU, else ONNX Runtime
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(Choice):
    FP32 = "fp32"  # the model as given
    FP16 = "fp16"
    INT8 = "int8"


class Int8Target(Choice):
    """The device an INT8 model is calibrated for (its quantization scheme: precision.INT8_SCHEMES)."""

    GPU = "gpu"
    CPU = "cpu"
