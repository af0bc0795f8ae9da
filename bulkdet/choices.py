"""The fixed choices of the command line, shared by the CLI (its --help and its checks) and the code
that acts on them: one home for the names `--device`, `--backend`, `--precision`, `--target`, `--layout`,
`--channels` take."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str Enum that prints as its value: "cpu", not "Device.CPU" (f-strings, JSON, run.json)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: str, option: str):
        """The member named `value`; ValueError naming the option and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{option} {value!r} is not one of {', '.join(m.value for m in cls)}") from None


class Device(Choice):
    AUTO = "auto"  # the GPU when its whole path is usable, else the CPU (and the log says why)
    CPU = "cpu"
    GPU = "gpu"


class Backend(Choice):
    AUTO = "auto"  # TensorRT when usable on the GPU, else ONNX Runtime
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(Choice):
    FP32 = "fp32"  # the model as given
    FP16 = "fp16"
    INT8 = "int8"


class Layout(Choice):
    """A detector's output layout (`run --layout`; model/layouts.py, docs/models.md)."""

    YOLOV8 = "yolov8"
    YOLOV5 = "yolov5"
    END2END = "end2end"
    DETR = "detr"
    BOXES_SCORES = "boxes-scores"
    NMS4 = "nms4"


class InputScale(Choice):
    """The pixel range of the model's image input before --mean / --std (`run --input-scale`)."""

    ONE = "1"  # 0..1
    BYTE = "255"  # 0..255 (YOLOX, mmdetection-style configs)


class Channels(Choice):
    """The channel order of the model's image input (`run --channels`)."""

    RGB = "rgb"
    BGR = "bgr"  # OpenCV-trained models (YOLOX since 0.2, mmdetection with to_rgb=False)


class Int8Target(Choice):
    """The device an INT8 model is calibrated for (its quantization scheme: precision.INT8_SCHEMES)."""

    GPU = "gpu"
    CPU = "cpu"


# Ranges of the numeric options (checked when the command line is parsed: exit 2 outside them).
# --imgsz: YOLO strides are 32 (P5) or 64 (P6), so 32 is the smallest input with one cell. The
# input tensor grows with imgsz squared: at 8192 one 4:3 image is a 8192x6144 float32 input of
# 600 MB, and a run of the tiny analytic demo detector at batch 1 peaks at 7.5 GB of memory
# (measured; a real detector's activations take several times more). Beyond that, tile the image.
IMGSZ_MIN, IMGSZ_MAX = 32, 8192
# --max-batch: GPU engines hold buffers of max-batch inputs (1024 640x640 float32 inputs: 5 GB a buffer).
MAX_BATCH = 1024
# --dali-threads, --infer-threads, --infer-workers, --workers: more than any machine has cores.
MAX_THREADS = 1024
# --max-det: the most detections kept per image; also the cap on candidates before NMS (as the
# reference YOLO predictors do) and the size of the output of a model with --nms-in-model.
MAX_DET = 30_000
# pack --shard-size-mb: below 0.1 MB a shard holds less than one photo; above 1e6 MB (1 TB) one
# shard, the unit of resume and of scale-out, would be a whole archive.
SHARD_MB_MIN, SHARD_MB_MAX = 0.1, 1e6


class TileMerge(Choice):
    """How the boxes of an image's tiles are merged (`--tile-merge`)."""

    NMM = "nmm"  # greedy non-max merging: matching boxes become their union, best score
    NMS = "nms"  # non-max suppression: matching boxes are dropped


class TileMatch(Choice):
    """When two boxes match (`--tile-match`): intersection over union, or over the smaller box."""

    IOS = "ios"
    IOU = "iou"


# --tile: the tile side in original pixels (0 = no tiling); below 32 a tile has no model cell,
# and one tile cannot exceed the largest input (--imgsz's limit). --tile-overlap below 1: the
# tiles must advance.
TILE_MIN, TILE_MAX = 32, IMGSZ_MAX
TILE_OVERLAP_MAX = 0.9
