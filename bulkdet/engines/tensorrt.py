"""TensorRT backend (10.x and 11.x): a strongly typed engine from the prepared ONNX, cached.

Kept thin on purpose: the input buffers, streams and the decoder hand-off are the shared CUDA
plumbing (engines/cuda.py) that the ONNX Runtime CUDA backend also uses; precision comes from
the prepared ONNX (bulkdet/model/precision.py), never from builder flags (TensorRT 11 removed them).

* Optimisation profiles come from the planner's batch shapes (`optimization_profiles`): one
  profile per input shape when there are few (each gets its own execution context), else one
  profile spanning them all.
* The engine cache key (`engine_cache_key`) holds the prepared ONNX's sha256, the TensorRT
  version, the GPU name and compute capability and the profiles: an engine built elsewhere is
  never loaded; it is rebuilt. A timing cache per TensorRT version and GPU makes rebuilds fast.
* `execute_async_v3` on the engine's own CUDA stream, output buffers allocated once at the
  largest shapes; the decode thread fills the next input buffer meanwhile (two in flight).

The pure functions (profiles, cache key) are tested without TensorRT; the rest needs a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bulkdet.engines.base import InputSlot
from bulkdet.model.info import (EXTRA_INPUTS, ExtraInput, ModelInfo, extra_input_values, file_sha256, is_engine_file,
                                load_model_info, parse_names)
from bulkdet.store.atomic import write_bytes_atomic, write_json_atomic
from bulkdet.store.cache import cache_dir as default_cache_dir

log = logging.getLogger("bulkdet")

MAX_PROFILES = 4  # more distinct shapes than this share one spanning profile
CHANNELS = 3
ENGINE_FORMAT = 1  # bump when the way engines are built changes


@dataclass(frozen=True)
class Profile:
    """Input shapes [B,3,H,W] of one TensorRT optimisation profile."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def covers(self, shape) -> bool:
        return all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


def optimization_profiles(shapes, static: tuple[int | None, int | None, int | None] = (None, None, None),
                          max_profiles: int = MAX_PROFILES) -> list[Profile]:
    """Profiles covering every (batch, height, width) the planner makes.

    `static` holds the ONNX input's fixed batch/height/width (None where dynamic); those win.
    Batch runs from 1 (a shard's last batch is short) to the largest; the optimum is the largest
    batch at the shape that carries the most images.
    """
    shapes = [tuple(_fix(s, static)) for s in shapes]
    if not shapes:
        raise ValueError("no batch shapes to build optimisation profiles for")
    max_b = max(b for b, _, _ in shapes)
    min_b = static[0] or 1
    images = Counter()
    for b, h, w in shapes:
        images[(h, w)] += b
    sizes = sorted(images)
    if len(sizes) <= max_profiles:
        return [Profile((min_b, CHANNELS, h, w), (max_b, CHANNELS, h, w), (max_b, CHANNELS, h, w)) for h, w in sizes]
    common = max(sizes, key=lambda hw: (images[hw], hw))
    return [Profile((min_b, CHANNELS, min(h for h, _ in sizes), min(w for _, w in sizes)),
                    (max_b, CHANNELS, *common),
                    (max_b, CHANNELS, max(h for h, _ in sizes), max(w for _, w in sizes)))]


def _fix(shape, static):
    return [s if fixed is None else fixed for s, fixed in zip(shape, static)]


def profile_for(profiles: list[Profile], shape) -> int:
    """Index of the profile (and execution context) that runs a [B,3,H,W] input."""
    exact = [i for i, p in enumerate(profiles) if p.opt[2:] == tuple(shape[2:]) and p.covers(shape)]
    covering = exact or [i for i, p in enumerate(profiles) if p.covers(shape)]
    if not covering:
        raise ValueError(f"input {tuple(shape)} is outside every optimisation profile of the engine "
                         f"({[asdict(p) for p in profiles]})")
    return covering[0]


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: tuple[int, int],
                     profiles: list[Profile]) -> str:
    """What decides whether a serialized engine can be loaded and is the right one."""
    identity = {"onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
                "compute_capability": list(compute_capability), "profiles": [asdict(p) for p in profiles],
                "format": ENGINE_FORMAT}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def engine_cache_path(folder: Path, onnx_path: Path, key: str) -> Path:
    return Path(folder) / f"{Path(onnx_path).stem}.{key[:16]}.engine"


def timing_cache_path(folder: Path, trt_version: str, gpu_name: str, compute_capability: tuple[int, int]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return Path(folder) / f"timing-trt{trt_version}-{slug}-sm{compute_capability[0]}{compute_capability[1]}.cache"


# ---------------------------------------------------------------------------- needs TensorRT

def _trt():
    import tensorrt

    return tensorrt


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, profiles: list[Profile], timing_cache: Path) -> bytes:
    """Serialized strongly typed engine: the ONNX's own types decide the precision."""
    trt = _trt()
    logger = _logger()
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag for strong typing; 11 is always strongly typed and ignores it.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    name = next((t.name for t in inputs if len(t.shape) == 4), inputs[0].name)
    extras = [t.name for t in inputs if t.name != name]  # [B, 2] inputs (model/info.py EXTRA_INPUTS)
    for p in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(name, p.min, p.opt, p.max)
        for extra in extras:  # their batch follows the image's
            profile.set_shape(extra, (p.min[0], 2), (p.opt[0], 2), (p.max[0], 2))
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building the TensorRT engine for %s (%d profile(s)); it is cached for the next runs",
             onnx_path.name, len(profiles))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    write_bytes_atomic(bytes(config.get_timing_cache().serialize()), timing_cache, per_process=True)
    return bytes(plan)


def engine_profiles(engine, input_name: str) -> list[Profile]:
    trt_shapes = [engine.get_tensor_profile_shape(input_name, i) for i in range(engine.num_optimization_profiles)]
    return [Profile(*(tuple(int(d) for d in s) for s in shapes)) for shapes in trt_shapes]


class TensorRTEngine:
    name = "tensorrt"

    def __init__(self, model_path, shapes=None, cache_dir: Path | None = None, device_id: int = 0,
                 ring_slots: int = 4, onnx_sha256: str | None = None):
        from bulkdet.engines import cuda

        trt = _trt()
        cuda.set_device(device_id)
        self.device_id = device_id
        gpu_name, cc = cuda.device_properties(device_id)
        self.provider = f"TensorRT {trt.__version__} on {gpu_name} (sm{cc[0]}{cc[1]})"
        model_path = Path(model_path)
        runtime = trt.Runtime(_logger())
        if is_engine_file(model_path):  # given by the user: loaded as it is
            self.engine = runtime.deserialize_cuda_engine(model_path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"{model_path} does not load in TensorRT {trt.__version__} on {gpu_name}: "
                                   "build it again, or pass the ONNX model and let bulkdet build and cache it")
        else:
            self.engine = self._cached_or_built(trt, runtime, model_path, shapes, cache_dir, gpu_name, cc,
                                                onnx_sha256)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name = _image_input(self.engine, inputs)
        # Inputs besides the image (orig_target_sizes, im_shape, scale_factor): fed per batch from
        # small device buffers; a name bulkdet can't feed is refused as for ONNX (model/info.py).
        self.extra_inputs = _extra_inputs(trt, self.engine, [n for n in inputs if n != self.input_name])
        self.output_names = [n for n in names if n not in inputs]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtypes = [np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.output_names]
        self.profiles = engine_profiles(self.engine, self.input_name)
        self.stream = cuda.Stream()
        self.contexts = []
        for i in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(i, int(self.stream))
            self.contexts.append(context)
        self.stream.synchronize()
        self.outputs = self._allocate_outputs(cuda)
        max_batch = max(p.max[0] for p in self.profiles)
        self.extra_buffers = [cuda.DeviceBuffer(max_batch * 2 * np.dtype(e.dtype).itemsize) for e in self.extra_inputs]
        largest = max(self.profiles, key=lambda p: int(np.prod(p.max))).max
        self.ring = cuda.InputRing(ring_slots, int(np.prod(largest)), self.input_dtype, device_id)

    def _cached_or_built(self, trt, runtime, onnx_path, shapes, cache_dir, gpu_name, cc, onnx_sha256):
        info = load_model_info(onnx_path)
        profiles = optimization_profiles(shapes or [], (info.batch, info.height, info.width))
        folder = default_cache_dir(cache_dir) / "tensorrt"
        key = engine_cache_key(onnx_sha256 or file_sha256(onnx_path), trt.__version__, gpu_name, cc, profiles)
        path = engine_cache_path(folder, onnx_path, key)
        if path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                log.info("TensorRT engine from the cache: %s", path)
                return engine
            log.warning("cached engine %s does not load here: building it again", path)
        plan = build_engine(onnx_path, profiles, timing_cache_path(folder, trt.__version__, gpu_name, cc))
        write_bytes_atomic(plan, path, per_process=True)
        write_json_atomic({"onnx": str(onnx_path), "key": key, "tensorrt": trt.__version__, "gpu": gpu_name,
                           "compute_capability": list(cc), "profiles": [asdict(p) for p in profiles],
                           "names": info.names, "stride": info.stride, "end2end": info.end2end,
                           "layout": info.layout_hint},
                          path.with_suffix(".json"), per_process=True)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeError(f"TensorRT built an engine for {onnx_path} it cannot load")
        return engine

    def _allocate_outputs(self, cuda) -> list:
        """One device buffer per output, sized for the largest input of any profile."""
        sizes = [0] * len(self.output_names)
        for context, profile in zip(self.contexts, self.profiles):
            context.set_input_shape(self.input_name, profile.max)
            for extra in self.extra_inputs:
                context.set_input_shape(extra.name, (profile.max[0], 2))
            for k, name in enumerate(self.output_names):
                shape = tuple(context.get_tensor_shape(name))
                if min(shape) < 0:
                    raise RuntimeError(f"output {name} has a data-dependent shape {shape}: not supported")
                sizes[k] = max(sizes[k], int(np.prod(shape)) * self.output_dtypes[k].itemsize)
        return [cuda.DeviceBuffer(n) for n in sizes]

    def stage(self, tensor):
        """Decode-thread hand-off: copy a decoded batch into a free device input buffer."""
        return self.ring.stage(tensor)

    def infer(self, images) -> list[np.ndarray]:
        from bulkdet.engines import cuda

        cuda.set_device(self.device_id)
        if isinstance(images, InputSlot):  # staged by the decode thread: its owner releases it
            return self._execute(images)
        slot = self.ring.stage(images)
        try:
            return self._execute(slot)
        finally:
            self.ring.release(slot)

    def release(self, images) -> None:
        """After inference: a staged batch's device buffer goes back to the ring."""
        self.ring.release(images)

    def _execute(self, slot) -> list[np.ndarray]:
        """Run one staged batch on the context of its profile; outputs copied to the host."""
        context = self.contexts[profile_for(self.profiles, slot.shape)]
        context.set_input_shape(self.input_name, slot.shape)
        context.set_tensor_address(self.input_name, slot.ptr)
        b, _, h, w = slot.shape
        values = extra_input_values(self.extra_inputs, b, h, w)  # kept alive until the stream syncs
        for extra, buf in zip(self.extra_inputs, self.extra_buffers):
            buf.upload(values[extra.name], self.stream)
            context.set_input_shape(extra.name, values[extra.name].shape)
            context.set_tensor_address(extra.name, buf.ptr)
        for name, buf in zip(self.output_names, self.outputs):
            context.set_tensor_address(name, buf.ptr)
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        results = []
        for name, buf, dtype in zip(self.output_names, self.outputs, self.output_dtypes):
            host = np.empty(tuple(context.get_tensor_shape(name)), dtype)
            results.append(buf.download(host, self.stream))
        self.stream.synchronize()
        return results

    def close(self) -> None:
        for buf in self.outputs + self.extra_buffers:
            buf.free()
        self.ring.close()
        self.stream.close()


def _image_input(engine, inputs: list[str]) -> str:
    """The engine's image input [B, 3, H, W] (its only 4-D input)."""
    images = [n for n in inputs if len(engine.get_tensor_shape(n)) == 4]
    if len(images) != 1:
        raise RuntimeError(f"expected one image input [B, 3, H, W], the engine has inputs {inputs}")
    return images[0]


def _extra_inputs(trt, engine, names: list[str]) -> tuple[ExtraInput, ...]:
    extras = []
    for name in names:
        shape = tuple(int(d) if int(d) > 0 else None for d in engine.get_tensor_shape(name))
        if name not in EXTRA_INPUTS or len(shape) != 2 or shape[1] not in (None, 2):
            raise ValueError(f"the engine's input {name} {list(shape)} is not one bulkdet knows how to feed "
                             f"(it feeds the image [B, 3, H, W] and {', '.join(EXTRA_INPUTS)} [B, 2])")
        extras.append(ExtraInput(name, np.dtype(trt.nptype(engine.get_tensor_dtype(name))).type, shape))
    return tuple(extras)


def engine_model_info(path: Path, names_file: Path | None = None) -> ModelInfo:
    """ModelInfo for a serialized engine: I/O from the engine, names from --names or the engine's sidecar."""
    trt = _trt()
    path = Path(path)
    engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{path} does not load in TensorRT {trt.__version__} on this GPU")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    name = _image_input(engine, inputs)
    dims = [int(d) if int(d) > 0 else None for d in engine.get_tensor_shape(name)]
    outputs = tuple((n, tuple(int(d) if int(d) > 0 else None for d in engine.get_tensor_shape(n)))
                    for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    classes = parse_names(Path(names_file).read_text()) if names_file else {
        int(k): v for k, v in meta.get("names", {}).items()}
    return ModelInfo(path=path, sha256=file_sha256(path), input_name=name,
                     input_dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))).type,
                     batch=dims[0], height=dims[2], width=dims[3], names=classes,
                     stride=int(meta.get("stride", 32)), end2end=bool(meta.get("end2end", False)),
                     outputs=outputs, layout_hint=meta.get("layout"),
                     extra_inputs=_extra_inputs(trt, engine, [n for n in inputs if n != name]))
