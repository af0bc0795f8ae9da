"""ONNX Runtime backend."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, model_path, device: str = "cpu", threads: int | None = None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: the decoder needs those cycles.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, images) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: images})
