"""FP32 vs FP16 vs INT8 on the YOLOv8n-architecture model: model-only throughput and drift.

Everything runs in one process on the same data, so the figures are ratios against FP32
measured together (the machine may be shared: read the ratios, not the absolute numbers):

1. a photo-like JPEG set (benchmarks.dataset) packed with `bulkdet pack`;
2. the FP16 and INT8 models made by `bulkdet.model.precision` (INT8 calibrated on the set's images
   through bulkdet's own DALI preprocessing);
3. model-only throughput: the same letterboxed batches (decoded once) through an ONNX Runtime
   session per precision, warm-up first, best of `--reps` timed passes;
4. drift: `bulkdet.run.precision_check` over `--drift-images` images (FP32 as the reference);
5. NMS in the model (bulkdet.model.graph_nms) vs on the host: model time, host post-processing time.

    python -m benchmarks.precision [--device cpu|gpu] [--out FILE.json]

On the GPU (`--device gpu`, needs onnxruntime-gpu) the sessions use the CUDA provider; the
TensorRT figures come from `bulkdet run --backend tensorrt --precision ...` on a GPU machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.compute as pc

from benchmarks.dataset import make_jpeg_mix
from benchmarks.yolov8n import ensure_model
from bulkdet.run.decode import Decoder
from bulkdet.engines import create_engine
from bulkdet.model.info import load_model_info
from bulkdet.model.layouts import detect_batch
from bulkdet.ingest.pack import pack
from bulkdet.run.calibration import decoded_batches
from bulkdet.run.plan import plan_batches
from bulkdet.run.precision_check import Detector, check_precision, first_images
from bulkdet.run.postprocess import postprocess
from bulkdet.model.precision import Calibration, prepare_model, with_nms
from bulkdet.store.manifest import read_manifest
from bulkdet.store.shards import ShardReader

CONF, IOU, MAX_DET = 0.25, 0.45, 300


def session(path: Path, device: str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = (["CUDAExecutionProvider"] if device == "gpu" else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def model_only(paths: dict, batches: list[np.ndarray], device: str, threads: int | None, reps: int) -> dict:
    """Best-of-reps images/s per model over the same batches (cast to each model's input dtype).

    The passes are interleaved (model A, B, C, A, B, C, ...) so that a change in the machine's load
    during the measurement hits every model alike.
    """
    runs = {}
    for name, path in paths.items():
        sess = session(path, device, threads)
        inp = sess.get_inputs()[0]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        feeds = [{inp.name: b.astype(dtype)} for b in batches]
        sess.run(None, feeds[0])  # warm-up: kernels chosen, memory arenas grown
        runs[name] = (sess, feeds, dtype)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(reps):
        for name, (sess, feeds, _) in runs.items():
            t0 = time.perf_counter()
            for feed in feeds:
                sess.run(None, feed)
            best[name] = min(best[name], time.perf_counter() - t0)
    images = sum(len(b) for b in batches)
    return {name: {"images_per_s": round(images / best[name], 2), "seconds": round(best[name], 3), "images": images,
                   "provider": sess.get_providers()[0], "input_dtype": np.dtype(dtype).name}
            for name, (sess, _, dtype) in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("BULKDET_BENCH_CACHE", ".bench-cache")))
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--images", type=int, default=64, help="JPEGs in the benchmark set")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--drift-images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="batches timed per pass (model-only)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = ap.parse_args()

    cache = args.cache_dir
    model = ensure_model(cache)
    make_jpeg_mix(cache / f"jpegs-{args.images}", args.images)
    dataset = cache / f"dataset-{args.images}"
    pack(cache / f"jpegs-{args.images}", dataset, quiet=True)
    t0 = time.perf_counter()
    fp16 = prepare_model(model, "fp16", cache=cache)
    t1 = time.perf_counter()
    int8 = {target: prepare_model(model, "int8", Calibration(dataset, args.calib_images, imgsz=args.imgsz, feed=decoded_batches,
                                                             target=target), cache=cache)
            for target in ("cpu", "gpu")}
    t2 = time.perf_counter()
    # int8-cpu: uint8 activations (ONNX Runtime's x86 path); int8-gpu: symmetric int8 (TensorRT's).
    paths = {"fp32": model, "fp16": fp16.path, "int8-cpu": int8["cpu"].path, "int8-gpu": int8["gpu"].path}

    info = load_model_info(model)
    hw = (args.imgsz, args.imgsz)
    manifest = read_manifest(dataset)
    images = manifest.filter(pc.equal(manifest.column("status"), "ok"))  # not the set's marker file
    plan = first_images(plan_batches(images, hw, args.batch), args.batch * args.batches)
    reader = ShardReader(dataset / "shards")
    decoder = Decoder("cpu", args.batch, out_dtype=np.float32)
    tensors = [decoder.decode(b, reader.get_many(b.shard, b.keys)).tensor for b in plan]

    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "onnxruntime": ort.__version__, "device": args.device},
               "setup": {k: v for k, v in vars(args).items() if k not in ("cache_dir", "out")},
               "prepare_s": {"fp16": round(t1 - t0, 1) if not fp16.cached else "cached",
                             "int8 (both schemes)": round(t2 - t1, 1)},
               "model_only": {}, "drift": {}}
    results["model_only"] = model_only(paths, tensors, args.device, args.threads, args.reps)
    base = results["model_only"]["fp32"]["images_per_s"]
    for name in ("fp16", "int8-cpu", "int8-gpu"):
        results["model_only"][name]["vs_fp32"] = round(results["model_only"][name]["images_per_s"] / base, 3)

    # NMS in the model vs on the host: model time and host post-processing time, same batches.
    nms_model = with_nms(prepare_model(model, "fp32"), CONF, IOU, MAX_DET, cache)
    nc = len(info.names) or None
    nms_paths = {"host_nms": model, "nms_in_model": nms_model.path}
    results["nms_in_model"] = model_only(nms_paths, tensors, args.device, args.threads, args.reps)
    for name, path in nms_paths.items():
        end2end = name == "nms_in_model"
        sess = session(path, args.device, args.threads)
        outputs = [sess.run(None, {"images": t}) for t in tensors]
        t0 = time.perf_counter()
        layout = "end2end" if end2end else detect_batch(list(info.outputs), outputs[0], nc)
        dets = [postprocess(o, b, layout, CONF, IOU, MAX_DET) for o, b in zip(outputs, plan)]
        n_images = sum(len(t) for t in tensors)
        results["nms_in_model"][name].update(
            host_postprocess_ms_per_image=round(1e3 * (time.perf_counter() - t0) / n_images, 2),
            output_mb_per_image=round(sum(o.nbytes for o in outputs[0]) / len(tensors[0]) / 1e6, 3),
            detections=sum(len(d) for batch in dets for d in batch))

    drift_plan = first_images(plan_batches(images, hw, args.batch), args.drift_images)
    engines = {name: create_engine("onnxruntime", path, device=args.device, threads=args.threads,
                                   shapes=[(args.batch, *hw)]) for name, path in paths.items()}
    decoders = {np.dtype(e.input_dtype).name: Decoder(args.device, args.batch, out_dtype=e.input_dtype)
                for e in engines.values()}
    layout = functools.partial(detect_batch, list(info.outputs), nc=nc, end2end=info.end2end)
    detect = {name: Detector(e, decoders[np.dtype(e.input_dtype).name], layout, CONF, IOU, MAX_DET)
              for name, e in engines.items()}
    for name in ("fp16", "int8-cpu", "int8-gpu"):
        report = check_precision(drift_plan, lambda b: reader.get_many(b.shard, b.keys), detect["fp32"],
                                 detect[name], name)
        results["drift"][name] = {k: v for k, v in report.as_dict().items() if k != "examples"}
        print(report.summary())
    for e in engines.values():
        e.close()
    reader.close()

    print(f"\nmodel-only throughput, {args.batch}x3x{args.imgsz}x{args.imgsz}, "
          f"{args.batches} batches, best of {args.reps} interleaved ({args.device}):")
    for name, r in results["model_only"].items():
        print(f"  {name}: {r['images_per_s']:8.2f} images/s  ({r.get('vs_fp32', 1.0):.2f}x fp32, {r['provider']})")
    for name, r in results["nms_in_model"].items():
        print(f"  {name}: model {r['images_per_s']:.2f} images/s, host post-processing "
              f"{r['host_postprocess_ms_per_image']} ms/image, output {r['output_mb_per_image']} MB/image, "
              f"{r['detections']} detections")
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
