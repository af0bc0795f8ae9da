"""ONNX Runtime backend: CPU, or CUDA with IOBinding on the decoder's device output."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from bulkdet.engines.base import InputSlot, ring_elements
from bulkdet.model.info import ExtraInput, extra_input_values

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, model_path, device: str = "cpu", threads: int | None = None,
                 shapes: list[tuple[int, int, int]] | None = None, device_id: int = 0, ring_slots: int = 4):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: the decoder needs those cycles.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device == "gpu":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        if device == "gpu" and self.provider != "CUDAExecutionProvider":
            # onnxruntime-gpu falls back to the CPU when CUDA/cuDNN libraries do not load.
            raise RuntimeError("onnxruntime could not start its CUDA provider (CUDA or cuDNN libraries "
                               "missing or not matching onnxruntime-gpu); see its warnings above")
        inputs = self.session.get_inputs()
        image = next((i for i in inputs if len(i.shape) == 4), inputs[0])
        self.input_name = image.name
        self.input_dtype = _ORT_DTYPES.get(image.type, np.float32)
        # Inputs besides the image (model/info.py's EXTRA_INPUTS), fed per batch from its shape.
        self.extra_inputs = [ExtraInput(i.name, _ORT_DTYPES.get(i.type, np.float32), tuple(i.shape))
                             for i in inputs if i is not image]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device_id = device_id
        self.ring = None
        if device == "gpu":
            from bulkdet.engines.cuda import InputRing

            if not shapes:
                raise ValueError("the CUDA engine needs the batch shapes to size its input buffers")
            self.ring = InputRing(ring_slots, ring_elements(shapes), self.input_dtype, device_id)

    def stage(self, tensor):
        """Decode-thread hand-off: copy a decoded batch into a device input buffer (GPU only)."""
        return self.ring.stage(tensor) if self.ring else tensor

    def infer(self, images) -> list[np.ndarray]:
        if self.ring is None:
            return self.session.run(None, {self.input_name: images, **self._extra(images.shape)})
        if isinstance(images, InputSlot):  # staged by the decode thread: its owner releases it
            return self.run_bound(images.ptr, images.shape, images.dtype, "cuda")
        slot = self.ring.stage(images)
        try:
            return self.run_bound(slot.ptr, slot.shape, slot.dtype, "cuda")
        finally:
            self.ring.release(slot)

    def release(self, images) -> None:
        """After inference: a staged batch's device buffer goes back to the ring (GPU only)."""
        if self.ring is not None:
            self.ring.release(images)

    def run_bound(self, ptr: int, shape, dtype, device_type: str) -> list[np.ndarray]:
        """Run on an input already in memory, bound by pointer (IOBinding): no copy of the input."""
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, device_type, self.device_id, np.dtype(dtype).type, list(shape), ptr)
        for name, value in self._extra(shape).items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")  # only the outputs come to the host
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _extra(self, shape) -> dict[str, np.ndarray]:
        """The extra inputs' values for a [B, 3, H, W] batch (none for most models)."""
        return extra_input_values(self.extra_inputs, shape[0], shape[2], shape[3]) if self.extra_inputs else {}

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
