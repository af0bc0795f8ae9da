"""What a model file is: an ONNX detector (input spec, stride, class names, output layout) or a TensorRT engine."""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}
ENGINE_SUFFIXES = (".engine", ".plan")  # serialized TensorRT engines; any other file is read as ONNX


def is_engine_file(path: Path) -> bool:
    """A serialized TensorRT engine (built for one TensorRT and GPU), not an ONNX model."""
    return Path(path).suffix in ENGINE_SUFFIXES


def model_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ONNX model's key-value metadata: class names, stride, and what bulkdet did to it."""
    return {p.key: p.value for p in model.metadata_props}


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    input_name: str
    input_dtype: type
    batch: int | None  # None: dynamic
    height: int | None
    width: int | None
    names: dict[int, str]
    stride: int
    end2end: bool  # metadata says the graph already ran NMS

    @property
    def fixed_shape(self) -> tuple[int, int] | None:
        return (self.height, self.width) if self.height and self.width else None


def _dim(d) -> int | None:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def parse_names(text: str) -> dict[int, str]:
    """Class names as exporters write them: "{0: 'person', ...}", a JSON list/dict, or lines."""
    text = text.strip()
    if not text:
        return {}
    for parse in (ast.literal_eval, json.loads):
        try:
            value = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, dict):
            return {int(k): str(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return dict(enumerate(map(str, value)))
    return dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))


def load_model_info(path: Path, names_file: Path | None = None) -> ModelInfo:
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    meta = model_metadata(model)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = [_dim(d) for d in tensor.shape.dim]
    if len(dims) != 4 or (dims[1] is not None and dims[1] != 3):
        raise ValueError(f"{path}: input must be [B,3,H,W], got {dims}")
    if tensor.elem_type not in _ONNX_DTYPES:
        raise ValueError(f"{path}: input dtype {onnx.TensorProto.DataType.Name(tensor.elem_type)} not supported")
    names = parse_names(Path(names_file).read_text()) if names_file else parse_names(meta.get("names", ""))
    return ModelInfo(
        path=path, sha256=file_sha256(path), input_name=inputs[0].name,
        input_dtype=_ONNX_DTYPES[tensor.elem_type], batch=dims[0], height=dims[2], width=dims[3],
        names=names, stride=int(meta.get("stride", 32) or 32),
        end2end=str(meta.get("end2end", "")).lower() == "true",
    )


def detect_layout(shape: tuple[int, ...], nc: int | None, end2end: bool = False) -> str:
    """Tell the output layout apart by shape: [B,4+nc,N], [B,N,5+nc] or [B,K,6]."""
    if len(shape) != 3:
        raise ValueError(f"unsupported output shape {shape}: expected 3 dimensions")
    _, a, b = shape
    if end2end and b == 6:
        return "end2end"
    if nc:
        if a == 4 + nc:
            return "yolov8"
        if b == 6 and a <= 1000:  # end-to-end heads keep a few hundred boxes
            return "end2end"
        if b == 5 + nc:
            return "yolov5"
        if b == 6:
            return "end2end"
        raise ValueError(f"output shape {shape} matches no layout for {nc} classes")
    if b == 6 and a <= 1000:
        return "end2end"
    return "yolov8" if a < b else "yolov5"
