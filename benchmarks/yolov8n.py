"""A YOLOv8n-architecture detector with random, deterministic weights -> ONNX.

No trained weights can be downloaded here, but the benchmarks need the real
model's compute (about 3.15 M parameters, 8.7 GFLOPs at 640x640) and the real
Ultralytics export interface: input `images` [B,3,H,W] float32 in 0..1,
output `output0` [B, 4+80, N] with (cx, cy, w, h) in input pixels followed by
80 sigmoid class scores, N = H/8*W/8 + H/16*W/16 + H/32*W/32.

Random weights alone would give useless activations and a flood (or total
absence) of detections, so after seeding the model is calibrated on a few
synthetic photo-like letterboxed images:
  * BatchNorm running statistics are measured, so every Conv outputs
    roughly unit-variance pre-activations at every depth;
  * class logits get the YOLO low prior bias per stride, a penalty on the
    mean feature activation (random features grow with input contrast, which
    would flood busy images and uniform noise with candidates) and a scale
    chosen so that only a few tens of anchors per image score above 0.25;
  * box (DFL) logits are scaled so the distance distributions are peaked,
    giving boxes of varied sizes instead of all-alike ones.
BatchNorm is then fused into the convolutions, as exporters do.

    python -m benchmarks.yolov8n OUT.onnx [--seed 0]
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.dataset import photo_like
from bulkdet.store.atomic import atomic_path

# Bump when anything changes the exported model; it is part of the cache name.
MODEL_VERSION = "v2"

COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]
NC = len(COCO_NAMES)
STRIDES = (8, 16, 32)
REG_MAX = 16

# Calibration targets: expected anchors per 640x640 image scoring > CONF,
# per stride (small objects are the most numerous), and DFL logit spread.
CONF = 0.25
TARGET_CANDIDATES = {8: 12, 16: 10, 32: 8}
DFL_LOGIT_STD = 2.0
ENERGY_PENALTY = 2.5


# ---------------------------------------------------------------- modules

class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU; 'same' padding."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)  # Ultralytics' values
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with a residual add when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block: split in two, chain n Bottlenecks on one half, concat every output."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss decode: expected value of a softmax over reg_max bins."""

    def __init__(self, c1: int = REG_MAX):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):  # [B, 4*c1, N] -> [B, 4, N]
        b, _, a = x.shape
        x = x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)
        return self.conv(x).view(b, 4, a)


class Detect(nn.Module):
    """Decoupled anchor-free head with in-graph decode (Ultralytics export form)."""

    def __init__(self, nc: int, ch: tuple[int, ...]):
        super().__init__()
        self.nc = nc
        c2 = max(16, ch[0] // 4, 4 * REG_MAX)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1)) for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(REG_MAX)
        for box, cls, s in zip(self.cv2, self.cv3, STRIDES):
            box[-1].bias.data[:] = 1.0
            cls[-1].bias.data[:] = math.log(5 / nc / (640 / s) ** 2)  # ~5 objects per image

    def forward(self, feats):
        b = feats[0].shape[0]
        box = torch.cat([m(f).view(b, 4 * REG_MAX, -1) for m, f in zip(self.cv2, feats)], 2)
        cls = torch.cat([m(f).view(b, self.nc, -1) for m, f in zip(self.cv3, feats)], 2)
        anchors, strides = make_anchors(feats)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = anchors - lt, anchors + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((xywh, cls.sigmoid()), 1)


def make_anchors(feats, offset: float = 0.5):
    """Grid-cell centres [1, 2, N] (in cells) and their strides [1, 1, N].

    Built from the feature shapes so the traced ONNX graph keeps dynamic H, W.
    """
    points, strides = [], []
    for f, s in zip(feats, STRIDES):
        h, w = f.shape[2:]
        sx = torch.arange(w, dtype=torch.float32) + offset
        sy = torch.arange(h, dtype=torch.float32) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), 0).view(2, -1))
        strides.append(torch.full((1, h * w), float(s)))
    return torch.cat(points, 1).unsqueeze(0), torch.cat(strides, 1).unsqueeze(0)


def _ch(c: int, width: float = 0.25, max_ch: int = 1024) -> int:
    return int(math.ceil(min(c, max_ch) * width / 8) * 8)


def _n(n: int, depth: float = 0.33) -> int:
    return max(round(n * depth), 1)


class YOLOv8n(nn.Module):
    """YOLOv8 with the n scaling (depth 0.33, width 0.25, max channels 1024)."""

    def __init__(self, nc: int = NC):
        super().__init__()
        c = {k: _ch(k) for k in (64, 128, 256, 512, 1024)}  # 16, 32, 64, 128, 256
        self.backbone = nn.ModuleList([
            Conv(3, c[64], 3, 2),                     # 0  P1/2
            Conv(c[64], c[128], 3, 2),                # 1  P2/4
            C2f(c[128], c[128], _n(3), True),         # 2
            Conv(c[128], c[256], 3, 2),               # 3  P3/8
            C2f(c[256], c[256], _n(6), True),         # 4
            Conv(c[256], c[512], 3, 2),               # 5  P4/16
            C2f(c[512], c[512], _n(6), True),         # 6
            Conv(c[512], c[1024], 3, 2),              # 7  P5/32
            C2f(c[1024], c[1024], _n(3), True),       # 8
            SPPF(c[1024], c[1024], 5),                # 9
        ])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td_p4 = C2f(c[1024] + c[512], c[512], _n(3))   # 12
        self.td_p3 = C2f(c[512] + c[256], c[256], _n(3))    # 15 -> P3 out
        self.down_p3 = Conv(c[256], c[256], 3, 2)           # 16
        self.bu_p4 = C2f(c[256] + c[512], c[512], _n(3))    # 18 -> P4 out
        self.down_p4 = Conv(c[512], c[512], 3, 2)           # 19
        self.bu_p5 = C2f(c[512] + c[1024], c[1024], _n(3))  # 21 -> P5 out
        self.detect = Detect(nc, (c[256], c[512], c[1024]))

    def forward(self, x):
        feats = []
        for i, m in enumerate(self.backbone):
            x = m(x)
            if i in (4, 6):
                feats.append(x)
        p3, p4, p5 = feats[0], feats[1], x
        t4 = self.td_p4(torch.cat((self.up(p5), p4), 1))
        o3 = self.td_p3(torch.cat((self.up(t4), p3), 1))
        o4 = self.bu_p4(torch.cat((self.down_p3(o3), t4), 1))
        o5 = self.bu_p5(torch.cat((self.down_p4(o4), p5), 1))
        return self.detect([o3, o4, o5])


# ------------------------------------------------------------ calibration

def letterboxed_images(n: int, seed: int, size: int = 640) -> torch.Tensor:
    """n synthetic photo-like images letterboxed to size x size, [n,3,H,W] in 0..1."""
    rng = np.random.default_rng([seed, 10])
    out = np.full((n, size, size, 3), 114, np.uint8)  # Ultralytics' pad grey
    shapes = [(size, size * 3 // 4), (size, size * 9 // 16), (size * 9 // 16, size)]
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        top, left = (size - h) // 2, (size - w) // 2
        out[i, top:top + h, left:left + w] = photo_like(w, h, rng)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def _calibrate(model: YOLOv8n, images: torch.Tensor) -> None:
    # 1. BatchNorm: measure the real running statistics (cumulative average).
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    model(images)
    model.eval()

    # 2. Head output convs: look at their inputs on the same images.
    seen: dict[nn.Conv2d, torch.Tensor] = {}
    heads = [seq[-1] for seq in (*model.detect.cv2, *model.detect.cv3)]
    hooks = [h.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0])) for h in heads]
    model(images)
    for h in hooks:
        h.remove()

    logit_conf = math.log(CONF / (1 - CONF))
    for box, cls, s in zip(model.detect.cv2, model.detect.cv3, STRIDES):
        # Peaked DFL distributions: scale the box logits to a fixed spread.
        conv = box[-1]
        z = F.conv2d(seen[conv], conv.weight)
        conv.weight.mul_(DFL_LOGIT_STD / z.std())

        # Class logits = prior + scale * (z - mean_c - k * (energy - mean)).
        # Centring per class stops a few classes firing everywhere. Random
        # conv features grow with input contrast (a busy photo, or noise,
        # gives several times the activations of a smooth one); subtracting
        # the mean activation ("energy") cancels that, so busy images do not
        # flood and smooth ones still get some candidates. The scale puts
        # the 0.25 threshold at the quantile leaving TARGET_CANDIDATES anchors
        # per calibration image.
        conv, h = cls[-1], seen[cls[-1]]
        z = F.conv2d(h, conv.weight)
        mean = z.mean(dim=(0, 2, 3))
        energy = h.mean(1)
        k = ENERGY_PENALTY * (z - mean.view(1, -1, 1, 1)).std() / energy.std()
        u = (z - mean.view(1, -1, 1, 1)).amax(1) - k * (energy - energy.mean())
        per_image = u[0].numel()
        tau = torch.quantile(u.flatten(), 1 - TARGET_CANDIDATES[s] / per_image)
        prior = math.log(5 / NC / (640 / s) ** 2)
        scale = (logit_conf - prior) / tau
        # Fold it all into the conv: energy is the channel mean of h.
        conv.weight.sub_(k / h.shape[1]).mul_(scale)
        conv.bias.copy_(prior - scale * (mean - k * energy.mean()))


@torch.no_grad()
def _fuse(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into its Conv2d (the exported graph has no BN)."""
    for m in model.modules():
        if isinstance(m, Conv):
            bn, conv = m.bn, m.conv
            k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              conv.stride, conv.padding, bias=True)
            fused.weight.copy_(conv.weight * k.view(-1, 1, 1, 1))
            fused.bias.copy_(bn.bias - bn.running_mean * k)
            m.conv, m.bn = fused, nn.Identity()
    return model


def build_model(seed: int = 0, calib_images: int = 6) -> YOLOv8n:
    """Seeded, calibrated, BN-fused YOLOv8n in eval mode."""
    torch.manual_seed(seed)
    model = YOLOv8n()
    _calibrate(model, letterboxed_images(calib_images, seed))
    return _fuse(model).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, h: int = 640, w: int = 640) -> int:
    """Conv FLOPs (2 x multiply-adds, the convention of the 8.7 G figure) for one image."""
    total = 0

    def hook(m, i, o):
        nonlocal total
        total += 2 * o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(torch.zeros(1, 3, h, w))
    for hk in hooks:
        hk.remove()
    return total


def count_candidates(output: np.ndarray, conf: float = CONF) -> list[int]:
    """Anchors per image whose best class score exceeds conf (what NMS gets)."""
    return [int(n) for n in (output[:, 4:].max(1) > conf).sum(1)]


# ----------------------------------------------------------------- export

def export_onnx(path: str | Path, seed: int = 0, opset: int = 17, verbose: bool = False) -> Path:
    """Build the model and write it as an Ultralytics-style ONNX file; return the path."""
    path = Path(path)
    model = build_model(seed)
    if verbose:
        print(f"parameters (BN fused): {count_params(model):,}  "
              f"(unfused {count_params(YOLOv8n()):,}); "
              f"GFLOPs at 640x640: {count_flops(model) / 1e9:.2f}")

    with atomic_path(path, per_process=True) as tmp:  # a half-written file is never seen at `path`
        with warnings.catch_warnings():  # the legacy (TorchScript) exporter is chosen on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                    model, (torch.zeros(1, 3, 640, 640),), str(tmp), dynamo=False,
                opset_version=opset, do_constant_folding=True,
                input_names=["images"], output_names=["output0"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                              "output0": {0: "batch", 2: "anchors"}},
            )
        m = onnx.load(str(tmp))
        # The tracer loses the static 84 through the dynamic reshapes; restore it.
        m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4 + NC
        describe(m, f"Random-weight YOLOv8n-architecture model for benchmarks (bulkdet benchmarks.yolov8n "
                    f"{MODEL_VERSION}, seed {seed}); detections are meaningless", COCO_NAMES)
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
        _check_onnx(tmp, verbose)
    return path


def describe(m: onnx.ModelProto, description: str, names: list[str]) -> None:
    """Write the metadata Ultralytics' exporter writes, so that Ultralytics (and SAHI through it)
    runs the file at its best: `args` says the batch and input sizes are dynamic (without it
    Ultralytics runs an ONNX file as static batch 1 at its export size)."""
    meta = {
        "description": description,
        "author": "bulkdet benchmarks",
        "version": MODEL_VERSION,
        "task": "detect",
        "stride": "32",
        "batch": "1",
        "imgsz": "[640, 640]",
        "names": str(dict(enumerate(names))),
        "args": str({"batch": 1, "dynamic": True, "half": False, "int8": False, "nms": False, "imgsz": 640}),
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)


def _check_onnx(path: Path, verbose: bool = False) -> None:
    """Run the file in ONNX Runtime (CPU) at square, rectangular and batched shapes."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, h, w in ((1, 640, 640), (1, 384, 640), (4, 640, 640)):
        x = letterboxed_images(b, seed=1234, size=max(h, w))[:, :, :h, :w].contiguous().numpy()
        t0 = time.perf_counter()
        (y,) = sess.run(["output0"], {"images": x})
        dt = time.perf_counter() - t0
        n = sum((h // s) * (w // s) for s in STRIDES)
        if y.shape != (b, 4 + NC, n) or not np.isfinite(y).all():
            raise RuntimeError(f"bad ONNX output {y.shape} for input {x.shape}")
        if verbose:
            print(f"onnxruntime CPU [{b},3,{h},{w}] -> {list(y.shape)} in {dt * 1e3:.0f} ms; "
                  f"candidates > {CONF} per image: {count_candidates(y)}")
    if verbose:
        noise = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
        (y,) = sess.run(["output0"], {"images": noise})
        print(f"candidates > {CONF} on a uniform-noise image: {count_candidates(y)}")


def ensure_model(cache_dir: str | Path, seed: int = 0) -> Path:
    """Path of the cached benchmark model, exporting it on first use."""
    path = Path(cache_dir) / f"yolov8n-random-{MODEL_VERSION}-seed{seed}.onnx"
    if not path.is_file():
        export_onnx(path, seed=seed)
    return path


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Export a random-weight YOLOv8n to ONNX.")
    ap.add_argument("out", help="output .onnx path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = export_onnx(args.out, seed=args.seed, opset=args.opset, verbose=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    _main()
