"""A model that fails in the engine (a shape it rejects, an op it lacks, out of memory at batch 1):
one line naming the model, the batch shape and the engine's own words, with a hint where one helps."""

from __future__ import annotations

import re
from pathlib import Path

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"/\S+\.(?:h|cc|cpp):\d+ [^ (]+\(.*?\)(?: const)? ")  # ORT's C++ file:line function
_CAUSE_CHARS = 400  # an engine's message can hold a whole graph dump: its start says what went wrong

# (words in the engine's message, hint); the first that matches gives the hint.
_HINTS = (
    (("out of memory", "failed to allocate", "bad_alloc", "outofmemory", "out_of_memory"),
     "the model does not fit in memory even one image at a time: a smaller --imgsz, or another --device"),
    (("not implemented", "could not find an implementation", "not a registered", "no op registered",
      "unsupported", "not supported", "unrecognized attribute", "no opset import for domain"),
     "an op of the model is missing in this engine: {precision_hint}export the model with standard ONNX ops "
     "(an opset this ONNX Runtime supports), or try another --backend"),
    (("invalid dimensions", "shape", "dimension", "broadcast", "reshape", "profile", "invalid_argument"),
     "the model rejects this input shape: give the size it was exported for with --imgsz, "
     "or fewer images per batch with --max-batch"),
)


class ModelRunError(RuntimeError):
    """The engine failed on the model (not on an image): the run can't go on (exit code 1)."""


def engine_cause(exc: BaseException) -> str:
    """The engine's message on one line, without ONNX Runtime's status prefix."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", text)) or type(exc).__name__
    return text if len(text) <= _CAUSE_CHARS else text[:_CAUSE_CHARS] + " ..."


def _hint(cause: str, precision: str) -> str:
    low = cause.lower()
    for words, hint in _HINTS:
        if any(w in low for w in words):
            return hint.format(precision_hint="run it with --precision fp32, or " if precision != "fp32" else "")
    return ""


def model_run_error(model: Path, shape, exc: BaseException, precision: str = "fp32") -> ModelRunError:
    """The error of an inference call of `model` on a batch of `shape` ([B, 3, H, W]) that raised `exc`."""
    cause = engine_cause(exc)
    hint = _hint(cause, precision)
    dims = ", ".join(str(int(d)) for d in shape)
    return ModelRunError(f"the model {Path(model).name} failed on a batch of shape [{dims}]: {cause}"
                         + (f" (hint: {hint})" if hint else ""))


def model_load_error(model: Path, backend: str, exc: BaseException, precision: str = "fp32") -> ModelRunError:
    """The error of an engine that could not load `model` (an op it lacks, a graph it refuses)."""
    cause = engine_cause(exc)
    hint = _hint(cause, precision)
    return ModelRunError(f"{backend} could not load the model {Path(model).name}: {cause}"
                         + (f" (hint: {hint})" if hint else ""))
