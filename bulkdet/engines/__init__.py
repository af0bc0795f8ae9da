"""Inference backends behind one small interface (see base.Engine)."""

from bulkdet.engines.base import Engine
from bulkdet.model.info import is_engine_file, load_model_info


def model_info(path, names_file=None, sha256: str | None = None):
    """ModelInfo of an ONNX model, or of a serialized TensorRT engine (read with TensorRT).
    `sha256`: the file's, when the caller has it already."""
    if is_engine_file(path):
        from bulkdet.engines.tensorrt import engine_model_info

        return engine_model_info(path, names_file)
    return load_model_info(path, names_file, sha256)


def create_engine(backend: str, model_path, device: str = "cpu", threads: int | None = None,
                  shapes=None, cache_dir=None, ring_slots: int = 4) -> Engine:
    """`shapes`: the planner's (batch, height, width) list; GPU engines size buffers and profiles by it."""
    if backend == "onnxruntime":
        from bulkdet.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_path, device=device, threads=threads, shapes=shapes, ring_slots=ring_slots)
    if backend == "tensorrt":
        if device != "gpu":
            raise ValueError("TensorRT runs on the GPU only")
        from bulkdet.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(model_path, shapes=shapes, cache_dir=cache_dir, ring_slots=ring_slots)
    raise ValueError(f"unknown backend {backend!r}")
