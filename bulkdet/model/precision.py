"""Precision as a property of the ONNX: FP16 conversion, INT8 Q/DQ calibrated on the user's images, a cache.

TensorRT 11 builds strongly typed networks only (no FP16/INT8 builder flags, no calibrators),
so the precision has to be in the model file itself. The same prepared file then serves
TensorRT 10/11 and ONNX Runtime (CPU and CUDA):

* fp16: the graph converted to float16 by onnxconverter-common (input and output float16:
  the decoder writes float16 directly, the post-processing reads it as float32);
* int8: explicit QuantizeLinear/DequantizeLinear pairs from ONNX Runtime's `quantize_static`
  (QDQ format), with ranges calibrated on images of the user's own dataset decoded and
  letterboxed by bulkdet's own DALI graph. Two schemes (`INT8_SCHEMES`), chosen by the device
  the model is for: "gpu" = symmetric int8 activations (TensorRT reads zero point 0 only; the
  file runs on the CPU too), "cpu" = uint8 activations with zero points (the fast x86 path of
  ONNX Runtime, and closer to FP32 after SiLU, whose outputs are mostly positive).

Prepared files are cached under `cache_dir()/models` (bulkdet/store/cache.py), named by a key
over everything that changes their content (see `cache_key`); a second `prepare` or `run` finds
them there. What comes back is a `ModelFile`: the file that runs and how it was made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc

from bulkdet.choices import Int8Target, Precision
from bulkdet.model.graph_nms import NMS_VERSION, add_nms
from bulkdet.model.info import (InputNorm, extra_input_values, file_sha256, is_engine_file, load_model_info,
                                model_input_hw, model_metadata, model_norm, read_onnx, split_inputs)
from bulkdet.store.atomic import commit, copy_atomic, write_json_atomic
from bulkdet.store.cache import cache_dir

log = logging.getLogger("bulkdet")

# Bump when the recipe changes (block lists, quantizer options): old cache entries stop matching.
RECIPE_VERSION = 4
DEFAULT_CALIB_IMAGES = 64
CALIB_BATCH = 8
# Metadata written into every prepared ONNX, so a prepared file describes itself.
META_PRECISION = "bulkdet.precision"
META_SOURCE = "bulkdet.source_sha256"
META_CALIBRATION = "bulkdet.calibration"
# Ops that carry weights: INT8 pays off there. Nodes after the last of them (box decoding, the
# concatenation of pixel coordinates with 0..1 scores) stay float: one int8 scale cannot hold both.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# INT8 schemes by target device. Measured on the YOLOv8n-architecture model, ONNX Runtime CPU
# (x86 AVX2, no VNNI): uint8 activations ran 1.6x faster than FP32 with half the box error of
# symmetric int8, which ran slower than FP32. TensorRT needs symmetric int8 (zero point 0).
INT8_SCHEMES = {Int8Target.GPU: {"activations": "QInt8", "symmetric": True},
                Int8Target.CPU: {"activations": "QUInt8", "symmetric": False}}
# The FP16 converter does not rewrite a Cast's `to` attribute: the model's own Cast-to-float
# nodes are kept in float32 (blocked by name, followed by a cast to float16).
FP16_BLOCKED_CASTS = frozenset({onnx.TensorProto.FLOAT})


# Decoded model inputs of a calibration sample (float32 [n,3,H,W] batches).
CalibrationFeed = Callable[["CalibrationSample"], Iterable[np.ndarray]]


@dataclass(frozen=True)
class Calibration:
    """Which images calibrate INT8: N images of a packed dataset, drawn with a seed."""

    dataset: Path
    images: int = DEFAULT_CALIB_IMAGES
    seed: int = 0
    imgsz: int = 640  # input size for models with a dynamic input shape
    target: str = "gpu"  # the INT8 scheme: "gpu" (TensorRT-compatible, runs everywhere) or "cpu"
    norm: InputNorm | None = None  # the images' input normalisation (None: the model's metadata's, else none)
    # The sample's images as model inputs (run/calibration.py decodes them with the run's own
    # graph); passed in so that the model tools do not depend on the run's stages.
    feed: CalibrationFeed | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModelFile:
    """The model file that runs, and how it was made from the user's model (its source)."""

    path: Path
    precision: str  # fp32 | fp16 | int8, or "engine" for a serialized TensorRT engine
    source_sha256: str
    sha256: str
    cached: bool  # True when found in the cache, False when made now (or fp32: the source itself)
    calibration: dict | None = None  # the sample INT8 was calibrated on
    nms: bool = False  # NMS appended to the graph (with_nms)

    def as_dict(self) -> dict:
        """Plain data for run.json."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def model_precision(model: onnx.ModelProto | Path) -> str | None:
    """The precision a prepared file declares in its metadata (None: not prepared by bulkdet)."""
    if not isinstance(model, onnx.ModelProto):
        model = read_onnx(model)
    return model_metadata(model).get(META_PRECISION)


def cache_key(source_sha256: str, precision: str, calibration: dict | None, tools: dict) -> str:
    """sha256 over what decides the prepared file's content: source, precision, recipe, tools, sample."""
    identity = {"source_sha256": source_sha256, "precision": precision, "recipe": RECIPE_VERSION,
                "tools": tools, "calibration": calibration}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare_model(source: Path, precision: str, calibration: Calibration | None = None,
                  cache: Path | None = None, source_sha256: str | None = None) -> ModelFile:
    """The model at `precision`, from the cache or made now (and cached): what `bulkdet prepare` does.
    `source_sha256`: the source's, when the caller has read it already (hashed once)."""
    source = Path(source)
    precision = Precision.parse(precision, "precision").value
    source_sha = source_sha256 or file_sha256(source)
    if precision == "fp32":  # the source itself, not read again
        return ModelFile(source, precision, source_sha, source_sha, cached=False)
    declared = model_precision(source)
    if declared == precision:
        return ModelFile(source, precision, source_sha, source_sha, cached=False)
    if declared:
        raise ValueError(f"{source} is already prepared as {declared}; prepare {precision} from the fp32 model")
    sample = None
    if precision == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration images: pass a packed dataset (--calib DATASET_DIR)")
        sample = calibration_sample(calibration, source)
    tools = _tool_versions(precision)
    key = cache_key(source_sha, precision, sample and sample.identity, tools)
    label = f"{precision}-{sample.target}" if sample else precision

    def make(tmp_model: Path) -> None:
        if precision == "fp16":
            convert_fp16(source, tmp_model)
        else:
            quantize_int8(source, tmp_model, sample, calibration.feed)
        _stamp(tmp_model, source, source_sha, precision, sample and sample.identity)

    provenance = {"source": str(source), "source_sha256": source_sha, "precision": precision, "key": key,
                  "tools": tools, "calibration": sample and {**sample.identity, "dataset": str(calibration.dataset)}}
    path, cached = _cached(cache, f"{source.stem}.{label}.{key[:16]}.onnx", make, provenance)
    return ModelFile(path, precision, source_sha, file_sha256(path), cached=cached,
                     calibration=sample and sample.identity)


def _cached(cache: Path | None, name: str, make, provenance: dict) -> tuple[Path, bool]:
    """cache/models/name, made by make(temporary path) unless there; (path, found in the cache)."""
    folder = cache_dir(cache) / "models"
    path = folder / name
    if path.is_file():
        log.info("prepared model found in the cache: %s", path)
        return path, True
    folder.mkdir(parents=True, exist_ok=True)
    log.info("preparing %s (once; cached in %s)", name, folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".prepare-") as tmp:
        tmp_model = Path(tmp) / "model.onnx"
        make(tmp_model)
        commit(tmp_model, path)  # the cache never holds a half-written model
    write_json_atomic(provenance, path.with_suffix(".json"), per_process=True)
    return path, False


def with_nms(model: ModelFile, conf: float, iou: float, max_det: int, cache: Path | None = None) -> ModelFile:
    """The model file with NMS appended (bulkdet/model/graph_nms.py), cached like the others."""
    params = {"conf": conf, "iou": iou, "max_det": max_det}
    key = cache_key(model.sha256, model.precision + "+nms", params, {"graph_nms": NMS_VERSION})
    stem = Path(model.path).name.split(".")[0]
    provenance = {"model": str(model.path), "model_sha256": model.sha256, "nms": params, "key": key}
    path, cached = _cached(cache, f"{stem}.{model.precision}-nms.{key[:16]}.onnx",
                           lambda tmp: add_nms(model.path, tmp, conf, iou, max_det), provenance)
    return dataclasses.replace(model, path=path, sha256=file_sha256(path), cached=cached, nms=True)


def model_for_run(model: Path, precision: str, dataset: Path, calib_images: int, imgsz: int,
                  cache: Path | None = None, device: str = "gpu", feed: CalibrationFeed | None = None,
                  source_sha256: str | None = None, norm: InputNorm | None = None) -> ModelFile:
    """What `run --precision` runs: INT8 calibrates on the run's own dataset at the run's input size,
    in the scheme of the device it runs on. `source_sha256`: --model's, when already taken."""
    model = Path(model)
    if is_engine_file(model):
        if precision != "fp32":
            raise ValueError("a TensorRT engine's precision was fixed when it was built: "
                             "--precision applies to ONNX models")
        sha = source_sha256 or file_sha256(model)
        return ModelFile(model, "engine", sha, sha, cached=False)
    calibration = (Calibration(Path(dataset), calib_images, imgsz=imgsz, target=device, feed=feed, norm=norm)
                   if precision == "int8" else None)
    return prepare_model(model, precision, calibration, cache, source_sha256)


def export_prepared(model: ModelFile, out: Path) -> Path:
    """`prepare --out`: a copy of the prepared model, written atomically."""
    return copy_atomic(model.path, out, per_process=True)


# ------------------------------------------------------------------------------------ FP16

def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: both converters name new nodes after existing ones."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def convert_fp16(source: Path, out: Path) -> None:
    from onnxconverter_common.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    _name_nodes(model)
    # By name, not by op type: the Cast nodes the converter adds must not be blocked in turn.
    casts = [n.name for n in model.graph.node if n.op_type == "Cast" and
             any(a.name == "to" and a.i in FP16_BLOCKED_CASTS for a in n.attribute)]
    with warnings.catch_warnings():  # one warning per tiny weight clamped to float16's range
        warnings.simplefilter("ignore", UserWarning)
        model = convert_float_to_float16(model, keep_io_types=False, node_block_list=casts)
    onnx.save(model, str(out))


# ------------------------------------------------------------------------------------ INT8

@dataclass(frozen=True)
class CalibrationSample:
    dataset: Path
    rows: pa.Table  # manifest rows of the chosen images
    input_hw: tuple[int, int]
    max_batch: int
    target: str
    identity: dict  # what the cache key holds: the images' content hashes, the input shape, N, seed, target
    norm: InputNorm = InputNorm()  # the model input's normalisation (the calibration images get the run's)


def calibration_sample(calibration: Calibration, model_path: Path) -> CalibrationSample:
    """N decodable images of the dataset, drawn with the seed; identified by their content hashes."""
    Int8Target.parse(calibration.target, "int8 target")
    from bulkdet.store.manifest import read_manifest

    info = load_model_info(model_path)
    manifest = read_manifest(calibration.dataset)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    if len(ok) == 0:
        raise ValueError(f"{calibration.dataset}: no usable images to calibrate INT8 on")
    n = min(calibration.images, len(ok))
    if n < calibration.images:
        log.warning("calibrating INT8 on %d images: all the dataset has", n)
    chosen = np.sort(np.random.default_rng(calibration.seed).choice(len(ok), size=n, replace=False))
    rows = ok.take(pa.array(chosen))
    input_hw = model_input_hw(calibration.imgsz, info.stride, info.fixed_shape)
    keys = sorted(k.hex() for k in rows.column("key").to_pylist())
    norm = model_norm(calibration.norm, info)
    identity = {"images": n, "seed": calibration.seed, "input_hw": list(input_hw), "target": calibration.target,
                "content_sha256": hashlib.sha256("".join(keys).encode()).hexdigest(),
                **({} if norm.is_default else {"input_norm": norm.as_dict()})}
    return CalibrationSample(Path(calibration.dataset), rows, input_hw, info.batch or CALIB_BATCH,
                             calibration.target, identity, norm)


class _FeedReader:
    """ONNX Runtime's calibration reader over the caller's decoded batches."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str, extra_inputs=()):
        self.batches, self.input_name, self.extra_inputs = batches, input_name, extra_inputs
        self.images = 0

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        b, _, h, w = batch.shape  # the extra inputs (orig_target_sizes, ...) as a run feeds them
        return {self.input_name: batch, **extra_input_values(self.extra_inputs, b, h, w)}


def float_tail_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes from which no weighted op (Conv, MatMul, ...) can be reached."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    reaches = [False] * len(graph.node)
    for i in reversed(range(len(graph.node))):  # ONNX graphs are topologically sorted
        node = graph.node[i]
        reaches[i] = node.op_type in WEIGHTED_OPS or any(
            reaches[j] for out in node.output for j in consumers.get(out, ()))
    return [n.name for n, r in zip(graph.node, reaches) if not r]


def quantize_int8(source: Path, out: Path, sample: CalibrationSample, feed: CalibrationFeed) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = out.parent
    pre = work / "pre.onnx"
    try:  # shape inference + graph optimisation, as ONNX Runtime recommends before quantizing
        # ONNX's own shape inference suffices for CNNs; the symbolic one gives up on dynamic H, W.
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - the optimisation is optional; the raw model still quantizes
        log.warning("quantization pre-processing skipped (%s)", str(exc).splitlines()[0][:200])
        shutil.copyfile(source, pre)
    model = onnx.load(str(pre))
    _name_nodes(model)
    excluded = float_tail_nodes(model.graph)
    if all(n.op_type not in WEIGHTED_OPS for n in model.graph.node):
        log.warning("%s has no Conv/MatMul/Gemm: INT8 leaves the model in float", source.name)
    onnx.save(model, str(pre))
    if feed is None:
        raise ValueError("INT8 calibration needs its images decoded: Calibration(feed=...) "
                         "(bulkdet.run.calibration.decoded_batches)")
    image, extras = split_inputs(model, source)
    reader = _FeedReader(iter(feed(sample)), image.name, extras)
    scheme = INT8_SCHEMES[sample.target]
    quantize_static(
        str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=getattr(QuantType, scheme["activations"]), weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": scheme["symmetric"], "WeightSymmetric": True},
    )
    if reader.images == 0:
        raise ValueError(f"{sample.dataset}: none of the calibration images could be decoded")
    log.info("INT8 calibrated on %d images at %s", reader.images, sample.input_hw)


# ----------------------------------------------------------------------------------- common

def _tool_versions(precision: str) -> dict:
    if precision == "fp16":
        import onnxconverter_common

        return {"onnxconverter_common": onnxconverter_common.__version__}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def _stamp(path: Path, source: Path, source_sha: str, precision: str, calibration: dict | None) -> None:
    """Keep the source's metadata (class names, stride) and say what was done to the model."""
    model = onnx.load(str(path))
    src_meta = model_metadata(onnx.load(str(source), load_external_data=False))
    meta = {**src_meta, **model_metadata(model), META_PRECISION: precision, META_SOURCE: source_sha}
    if calibration:
        meta[META_CALIBRATION] = json.dumps(calibration, sort_keys=True)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))
