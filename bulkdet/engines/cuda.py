"""CUDA plumbing shared by the GPU backends (ONNX Runtime CUDA and TensorRT), on cuda-python.

cuda-python (`cuda.bindings`, NVIDIA's maintained binding, shipped as wheels) gives the CUDA
runtime API: the same primary context that DALI, ONNX Runtime and TensorRT use, so device
pointers pass between them as plain integers. pycuda was not chosen: it ships no wheels and
compiles against a CUDA toolkit at install time.

`InputRing` is the hand-off between the decoder and the engine: device buffers allocated once
at the largest batch, each holding one decoded batch in the dtype the engine reads. The
decode thread copies DALI's output into a free buffer (device to device, on its own stream,
no host round trip) while the engine still runs the previous batch from another buffer: two
batches in flight. The runner gives the buffer back (`engine.release`) when inference ends.
The slot type (`InputSlot`) is in engines/base.py: it needs no CUDA.
"""

from __future__ import annotations

import ctypes
import queue

import numpy as np
from cuda.bindings import runtime as cudart

from bulkdet.engines.base import InputSlot

RING_TIMEOUT_S = 600.0


def check(result):
    """Unpack a cuda.bindings result tuple (error, *values); raise on an error."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {err.name}: {text.decode(errors='replace')}")
    return values[0] if len(values) == 1 else (values or None)


def set_device(device_id: int) -> None:
    """The runtime API's current device is per thread: every thread that calls CUDA sets it."""
    check(cudart.cudaSetDevice(device_id))


def device_properties(device_id: int = 0) -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability)."""
    props = check(cudart.cudaGetDeviceProperties(device_id))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), (props.major, props.minor)


class Stream:
    def __init__(self):
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            check(cudart.cudaStreamDestroy(self.handle))
            self.handle = None


class DeviceBuffer:
    """nbytes of device memory, allocated once."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes)))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte device buffer")
        check(cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))

    def download(self, out: np.ndarray, stream: Stream) -> np.ndarray:
        check(cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))
        return out

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFree(self.ptr))
            self.ptr = 0


def tensor_shape(tensor) -> tuple[int, ...]:
    """Shape of a numpy array or of a DALI TensorGPU (whose shape is a method)."""
    shape = tensor.shape() if callable(getattr(tensor, "shape", None)) else tensor.shape
    return tuple(int(d) for d in shape)


class InputRing:
    """Device input buffers between the decode thread and the engine (see the module docstring)."""

    def __init__(self, slots: int, max_elements: int, dtype, device_id: int = 0):
        set_device(device_id)
        self.device_id = device_id
        self.dtype = np.dtype(dtype)
        self.buffers = [DeviceBuffer(max_elements * self.dtype.itemsize) for _ in range(slots)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self.free.put(i)
        self.stream = Stream()  # the copy stream: decoding never waits for inference

    def stage(self, tensor) -> InputSlot:
        """Copy a decoded batch (DALI TensorGPU on the GPU, or a host array) into a free buffer."""
        set_device(self.device_id)
        shape = tensor_shape(tensor)
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        try:
            index = self.free.get(timeout=RING_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError("no free device input buffer: the engine stopped taking batches") from None
        buf = self.buffers[index]
        try:
            if nbytes > buf.nbytes:
                raise ValueError(f"batch {shape} is larger than the device buffers ({buf.nbytes} bytes)")
            if isinstance(tensor, np.ndarray):
                if tensor.dtype != self.dtype:
                    raise TypeError(f"decoded batch is {tensor.dtype}, the engine reads {self.dtype}")
                buf.upload(tensor, self.stream)
            else:  # DALI TensorGPU, already in the engine's dtype (the decoder was built with it)
                tensor.copy_to_external(ctypes.c_void_p(buf.ptr), ctypes.c_void_p(int(self.stream)),
                                        non_blocking=True)
            self.stream.synchronize()  # the buffer is complete before another thread binds it
        except BaseException:
            self.free.put(index)
            raise
        return InputSlot(index, buf.ptr, shape, self.dtype,
                         capacity=buf.nbytes // (int(np.prod(shape[1:])) * self.dtype.itemsize))

    def release(self, slot) -> None:
        """Give a staged batch's buffer back (anything else, views included, is ignored)."""
        if isinstance(slot, InputSlot) and slot.owner:
            self.free.put(slot.index)

    def close(self) -> None:
        for buf in self.buffers:
            buf.free()
        self.stream.close()


