"""What a model file is: an ONNX detector (input spec, stride, class names, declared outputs) or a TensorRT engine."""

from __future__ import annotations

import ast
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bulkdet.choices import Channels, InputScale
from bulkdet.model.layouts import LayoutError, class_count, describe, detect

DEFAULT_STRIDE = 32  # pixels per output cell, when the model's metadata does not say
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
class InputNorm:
    """What the model's image input holds, per channel in `channels` order (RGB or BGR): x = pixel
    / 255 * scale (0..1 or 0..255), then (x - mean) / std, mean and std in the units of x and in
    the model's channel order (docs/models.md)."""

    scale: int = 1
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: Channels = Channels.RGB

    @property
    def bgr(self) -> bool:
        return self.channels is Channels.BGR

    @property
    def is_default(self) -> bool:
        return self == InputNorm()

    def on_bytes(self) -> tuple[list[float], list[float]]:
        """(mean, std) on 8-bit pixel values p, as DALI's crop_mirror_normalize takes them:
        (p - mean') / std' == (p / 255 * scale - mean) / std."""
        k = 255.0 / self.scale
        return [m * k for m in self.mean], [s * k for s in self.std]

    def as_dict(self) -> dict:
        # The channel order only when BGR: the identity of runs made before it existed stays the same.
        return {"input_scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                **({"channels": self.channels.value} if self.bgr else {})}


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, in 0..1 units (torchvision's; times 255 in mmdet's configs)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = {"imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
# The model's metadata keys that say its normalisation (the spelling of --input-scale, --mean, --std,
# --channels).
NORM_KEYS = ("input_scale", "mean", "std", "channels")


def parse_norm(scale=None, mean: str | None = None, std: str | None = None, channels=None) -> InputNorm:
    """The normalisation given as text ("1" | "255"; "R,G,B", one value for all three, a JSON
    list, or "imagenet"; "rgb" | "bgr"), None for a default. ValueError naming the value and its
    range when wrong: 3 finite values, mean within 0..scale, std within (0, scale]."""
    text = str(scale if scale is not None else 1).strip()
    if text not in {m.value for m in InputScale}:
        raise ValueError(f"input scale {scale!r} is not 1 (a 0..1 input) or 255 (a 0..255 input)")
    scale = int(text)
    order = Channels.parse(str(channels or Channels.RGB).strip().lower(), "channels")
    return InputNorm(scale, _per_channel("mean", mean, scale, 0.0, order),
                     _per_channel("std", std, scale, 1.0, order), order)


def _per_channel(what: str, text: str | None, scale: int, default: float,
                 order: Channels) -> tuple[float, float, float]:
    if text is None:
        return (default,) * 3
    text = str(text).strip()
    if text.lower() in PRESETS:  # a preset names the statistics: given in the model's channel order
        rgb = PRESETS[text.lower()][what]
        return tuple(v * scale for v in (rgb[::-1] if order is Channels.BGR else rgb))
    try:
        values = [float(v) for v in text.strip("[]()").replace(" ", ",").split(",") if v]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or not all(map(math.isfinite, values)):
        raise ValueError(f"{what} {text!r} is not 3 numbers, one per channel in the model's order "
                         f"(or one for all, or {', '.join(PRESETS)})")
    values = values * 3 if len(values) == 1 else values
    low = min(values)
    if low < 0 or (what == "std" and low == 0) or max(values) > scale:
        within = f"within 0..{scale}" if what == "mean" else f"above 0 and at most {scale}"
        hint = ", or input scale 255" if scale == 1 and 1 < max(values) <= 255 else ""
        raise ValueError(f"{what} {text} is not {within} (the pixel range of input scale {scale}): "
                         f"give it in those units{hint}")
    return tuple(values)


def model_norm(given: InputNorm | None, info: "ModelInfo") -> InputNorm:
    """The run's normalisation: the one given on the command line, else the model's metadata's, else none."""
    return given or info.norm or InputNorm()


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
    # Every declared output: (name, dims), None for a dynamic dimension (model/layouts.py reads them).
    outputs: tuple[tuple[str, tuple[int | None, ...]], ...] = ()
    layout_hint: str | None = None  # the layout the metadata names (Ultralytics' RT-DETR: detr)
    extra_inputs: tuple["ExtraInput", ...] = ()  # inputs besides the image, fed per batch (see EXTRA_INPUTS)
    norm: InputNorm | None = None  # the normalisation its metadata says (NORM_KEYS); None: not said

    @property
    def fixed_shape(self) -> tuple[int, int] | None:
        return (self.height, self.width) if self.height and self.width else None


@dataclass(frozen=True)
class ExtraInput:
    """An input besides the image that bulkdet knows how to feed (e.g. RT-DETR's orig_target_sizes)."""

    name: str
    dtype: type  # numpy dtype the model declares
    shape: tuple[int | None, ...]


# What the extra inputs of common exports mean, as a function of the batch's input (H, W). bulkdet
# letterboxes and un-letterboxes itself, so each is given the model input's own size: boxes come
# out in input pixels and the letterbox inverse maps them back (docs/models.md).
EXTRA_INPUTS = {
    "orig_target_sizes": lambda h, w: (w, h),  # RT-DETR / D-FINE: boxes scaled by (W, H)
    "im_shape": lambda h, w: (h, w),  # PaddleDetection: the resized image's (H, W)
    "scale_factor": lambda h, w: (1.0, 1.0),  # PaddleDetection: (scale_y, scale_x); no resize to undo
}


def extra_input_values(extras, batch: int, height: int, width: int) -> dict[str, np.ndarray]:
    """The value of each extra input for a batch of `batch` images of input size height x width."""
    return {e.name: np.tile(np.asarray(EXTRA_INPUTS[e.name](height, width), e.dtype), (batch, 1))
            for e in extras}


def _extra_input(path: Path, value) -> ExtraInput:
    """An extra (non-image) input bulkdet can feed; ValueError naming it (and what it feeds) if not."""
    tensor = value.type.tensor_type
    dims = tuple(_dim(d) for d in tensor.shape.dim)
    known = ", ".join(f"{name} [B, 2]" for name in EXTRA_INPUTS)
    if value.name not in EXTRA_INPUTS or len(dims) != 2 or dims[1] not in (None, 2):
        raise ValueError(f"{path}: its input {value.name} {_shape_text(dims)} is not one bulkdet knows how to "
                         f"feed (it feeds the image [B, 3, H, W] and {known}): export the model without it")
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).type
    except (KeyError, ValueError):
        dtype = np.float32
    return ExtraInput(value.name, dtype, dims)


def _shape_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _dim(d) -> int | None:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def parse_names(text: str) -> dict[int, str]:
    """Class names as exporters write them: "{0: 'person', ...}" (Ultralytics' metadata), a JSON
    list/dict, YAML (an Ultralytics data.yaml's `names`, a PaddleDetection infer_cfg.yml's
    `label_list`, "0: person" lines, "- person" lines), or plain lines.

    ValueError when a dict's keys are not the class ids 0..N-1."""
    text = text.strip()
    if not text:
        return {}
    for parse in (ast.literal_eval, json.loads, _yaml):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, RecursionError):
            continue
        if isinstance(value, dict) and not all(isinstance(k, int) for k in value):
            value = next((value[k] for k in NAMES_KEYS if isinstance(value.get(k), (dict, list))), value)
        if isinstance(value, dict):
            return _names_by_id(value)
        if isinstance(value, (list, tuple)):
            return dict(enumerate(map(str, value)))
    return dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))


NAMES_KEYS = ("names", "label_list")  # where a YAML file keeps the class names (Ultralytics, PaddleDetection)


def _yaml(text: str):
    """YAML that holds names: a mapping or a list (a plain lines file reads as one string: not taken)."""
    import yaml  # here only: most models carry their names otherwise, and the GPU test machine has no PyYAML

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    if not isinstance(value, (dict, list)):
        raise ValueError("no names in YAML form")
    return value


class UnknownClass(ValueError):
    """`--classes` names a class the model does not have: a usage error (exit 2)."""


def class_ids(classes: list[str] | None, names: dict[int, str], whose: str = "the model's") -> list[int] | None:
    """Class ids for the names or ids a user gives ("0,2", "person,car"; None or empty: all classes).
    UnknownClass naming the known ones for a name or id not among `names`."""
    if not classes:
        return None
    by_name = {v: k for k, v in names.items()}
    ids = []
    for c in (c.strip() for item in classes for c in str(item).split(",")):
        if c in by_name:
            ids.append(by_name[c])
        elif c.isdigit() and (int(c) in names or not names):
            ids.append(int(c))
        elif c:
            known = ", ".join(f"{k}={v}" for k, v in sorted(names.items())) or "none named (give ids, or --names)"
            raise UnknownClass(f"unknown class {c!r}; {whose} classes are: {known}")
    return sorted(set(ids)) or None


def _names_by_id(value: dict) -> dict[int, str]:
    try:
        names = {int(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ValueError(f"the keys of a names dict are class ids 0..N-1, got {list(value)[:5]}") from None
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"the keys of a names dict are class ids 0..N-1, got {sorted(names)[:10]}")
    return dict(sorted(names.items()))


def read_names_file(path: Path) -> dict[int, str]:
    """The class names of a --names file (see parse_names); ValueError saying what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"class names file {path} is not text: give one name per line, or a JSON list") from None
    try:
        names = parse_names(text)
    except ValueError as exc:
        raise ValueError(f"class names file {path}: {exc}") from None
    if not names:
        raise ValueError(f"class names file {path} holds no names: give one name per line, or a JSON list")
    return names


def read_onnx(path: Path) -> onnx.ModelProto:
    """The ONNX graph in `path` (weights in external files not loaded); ValueError when it is none."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ValueError(f"{path} is not an ONNX model ({exc}); give a detector's .onnx file "
                         f"(or a TensorRT engine named .engine or .plan)") from None
    if not model.graph.node:  # an empty file parses as an empty model
        raise ValueError(f"{path} is not an ONNX model (it holds no graph); give a detector's .onnx file "
                         f"(or a TensorRT engine named .engine or .plan)")
    return model


def check_names_fit(names: dict[int, str], outputs, end2end: bool, source: str) -> None:
    """ValueError when the outputs' shapes are known and no layout has len(names) classes."""
    outputs = list(outputs or ())
    if not names or not outputs or any(d is None for _, dims in outputs for d in dims[1:]):
        return  # nothing to check against: the layout is told at the first batch
    try:
        detect(outputs, len(names), end2end)
        return
    except LayoutError:
        pass
    try:
        layout = detect(outputs, None, end2end)
    except LayoutError:
        return  # no layout fits these outputs whatever the names: the layout's error says so
    nc = class_count(outputs, layout)
    if nc and len(names) < nc:  # the common mistake: a names file of another (smaller) dataset
        raise ValueError(f"{source} gives {len(names)} class names, fewer than the model's {nc} classes: "
                         f"give a name for every class the model has, in the order it was trained with")
    dims = outputs[0][1]
    if len(outputs) == 1 and len(dims) == 3:
        a, b = dims[1:]
        fits = [f"{n} (YOLOv{v} layout)" for n, v in ((a - 4, 8), (b - 5, 5)) if n > 0]
        raise ValueError(f"{source} gives {len(names)} class names, but the model's output shape "
                         f"[B, {a}, {b}] fits no layout for {len(names)} classes"
                         + (f"; it has {' or '.join(fits)}" if fits else "")
                         + ": give the names the model was trained with")
    raise ValueError(f"{source} gives {len(names)} class names, but the model's outputs {describe(outputs)} "
                     f"fit no layout for {len(names)} classes: give the names the model was trained with")


def layout_hint(meta: dict[str, str]) -> str | None:
    """The layout a model's metadata names: Ultralytics' RT-DETR exports say so in their description."""
    description = meta.get("description", "").lower()
    return "detr" if "rtdetr" in description or "rt-detr" in description else None


def split_inputs(model: onnx.ModelProto, path: Path):
    """(the image input's ValueInfo, the extra inputs bulkdet feeds); ValueError naming an input it can't."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    images = [i for i in inputs if len(i.type.tensor_type.shape.dim) == 4] or inputs[:1]
    if not images:
        raise ValueError(f"{path}: the model has no input; expected an image input [B, 3, H, W]")
    if len(images) > 1:
        raise ValueError(f"{path}: expected one image input [B, 3, H, W], found {[i.name for i in images]}")
    image = images[0]
    return image, tuple(_extra_input(path, i) for i in inputs if i is not image)


def load_model_info(path: Path, names_file: Path | None = None, sha256: str | None = None) -> ModelInfo:
    """`sha256`: the file's, when the caller has it already (a model can be large: hashed once)."""
    path = Path(path)
    model = read_onnx(path)
    meta = model_metadata(model)
    image, extra_inputs = split_inputs(model, path)
    tensor = image.type.tensor_type
    dims = [_dim(d) for d in tensor.shape.dim]
    if len(dims) != 4 or (dims[1] is not None and dims[1] != 3):
        raise ValueError(f"{path}: input must be [B,3,H,W], got {dims}")
    if tensor.elem_type not in _ONNX_DTYPES:
        raise ValueError(f"{path}: input dtype {onnx.TensorProto.DataType.Name(tensor.elem_type)} not supported")
    outputs = tuple((o.name, tuple(_dim(d) for d in o.type.tensor_type.shape.dim)) for o in model.graph.output)
    end2end = str(meta.get("end2end", "")).lower() == "true"
    if names_file:
        names, source = read_names_file(names_file), f"class names file {names_file}"
    else:
        try:
            names, source = parse_names(meta.get("names", "")), f"{path}'s metadata"
        except ValueError as exc:
            raise ValueError(f"{path}: class names in its metadata: {exc}; give them with --names") from None
    check_names_fit(names, outputs, end2end, source)
    norm = None
    if any(k in meta for k in NORM_KEYS):
        try:
            norm = parse_norm(*(meta.get(k) for k in NORM_KEYS))
        except ValueError as exc:
            raise ValueError(f"{path}: its metadata's input normalisation: {exc}") from None
    return ModelInfo(
        path=path, sha256=sha256 or file_sha256(path), input_name=image.name,
        input_dtype=_ONNX_DTYPES[tensor.elem_type], batch=dims[0], height=dims[2], width=dims[3],
        names=names, stride=_stride(meta.get("stride"), path),
        end2end=end2end, outputs=outputs, layout_hint=layout_hint(meta), extra_inputs=extra_inputs, norm=norm,
    )


def _stride(value: str | None, path: Path) -> int:
    """The model's stride from its metadata (default 32): a positive whole number of pixels."""
    try:
        stride = int(value or DEFAULT_STRIDE)
    except ValueError:
        stride = 0
    if stride <= 0:
        raise ValueError(f"{path}: its metadata gives stride {value!r}, not a positive whole number of pixels")
    return stride


def model_input_hw(imgsz: int, stride: int = DEFAULT_STRIDE,
                   fixed_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """The model's full input (H, W): its fixed shape, else imgsz rounded up to the stride on both
    sides. Images are resized to fit it; a bucket is this or narrower on one side."""
    if fixed_hw:
        return int(fixed_hw[0]), int(fixed_hw[1])
    side = -(-int(imgsz) // stride) * stride
    return side, side
