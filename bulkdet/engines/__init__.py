"""Inference backends behind one small interface (see base.Engine)."""

from bulkdet.engines.base import Engine


def create_engine(backend: str, model_path, device: str = "cpu", threads: int | None = None) -> Engine:
    if backend == "onnxruntime":
        from bulkdet.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_path, device=device, threads=threads)
    raise ValueError(f"unknown backend {backend!r}")
