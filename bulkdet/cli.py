"""The `bulkdet` command line: parses options and calls one function per command."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from bulkdet.ingest.imageinfo import DEFAULT_MAX_PIXELS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Offline bulk object detection: pack images into shards, run a detector, report.")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_INPUTS = 0, 1, 2, 3


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="bulkdet: %(message)s")


@app.command()
def pack(
    src_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of images (walked recursively)."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to create or extend."),
    shard_size_mb: float = typer.Option(1024, help="Target size of one LMDB shard (MB; fractions allowed)."),
    follow_symlinks: bool = typer.Option(False, help="Follow symbolic links (loops are detected)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Larger images get status too_large."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
):
    """Store every image under SRC_DIR, bytes unchanged, in LMDB shards plus a manifest."""
    from bulkdet.ingest.pack import pack as do_pack

    _setup_logging(quiet)
    try:
        s = do_pack(src_dir, out, shard_size_mb, follow_symlinks, max_pixels, quiet=quiet)
    except (OSError, RuntimeError) as exc:  # e.g. disk full: committed shards are kept and reused
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR)
    not_usable = {st: n for st, n in s.by_status.items() if st != "ok"}
    typer.echo(f"packed {s.new} new files ({s.found} in all, {s.duplicates} duplicate contents stored once, "
               f"{s.stored_bytes / 1e6:.1f} MB stored) into {s.shards} shard(s) in {out}"
               + (f"; {sum(not_usable.values())} not usable: {not_usable}" if not_usable else ""))


@app.command()
def run(
    dataset_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Dataset made by `bulkdet pack`."),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="Detector (.onnx)."),
    out: Path = typer.Option(..., "--out", help="Run folder (created; an existing one is resumed)."),
    device: str = typer.Option("auto", help="auto | cpu | gpu"),
    backend: str = typer.Option("auto", help="auto | onnxruntime | tensorrt"),
    imgsz: int = typer.Option(640, help="Model input size (long side) for dynamic-shape models."),
    max_batch: int = typer.Option(32, help="Most images in one batch."),
    conf: float = typer.Option(0.25, help="Score threshold."),
    iou: float = typer.Option(0.45, help="NMS IoU threshold."),
    max_det: int = typer.Option(300, help="Most detections kept per image."),
    names: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Class names file (one per line, or JSON)."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | int8"),
    overwrite: bool = typer.Option(False, help="Replace a previous run in --out made with other settings."),
    dali_threads: Optional[int] = typer.Option(None, help="DALI CPU threads (default: a sixth of the cores on CPU, all on GPU)."),
    infer_threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads per batch (default: cores / workers)."),
    infer_workers: Optional[int] = typer.Option(None, min=1, help="Batches inferred at once (default: min(cores, 4) on CPU, 1 on GPU)."),
    pixel_budget: Optional[int] = typer.Option(
        None, min=1, help="Most input pixels (padded) in one batch (default: two 640x640 inputs on CPU, --max-batch on GPU)."),
    decode_budget: Optional[int] = typer.Option(
        None, min=1, help="Most original pixels decoded at once; bigger batches are split (default: 64e6)."),
    commit_every: int = typer.Option(4096, min=1, help="Commit a Parquet part every N images: what a kill can cost."),
    retry_failed: bool = typer.Option(False, help="Process again the images whose status is not ok."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
    use_ray: bool = typer.Option(False, "--ray", help="Spread the shards over a Ray cluster (needs bulkdet[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: RAY_ADDRESS, or a local one)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Ray workers (default: one per GPU, or one per machine)."),
    check_precision: int = typer.Option(0, min=0, help="Also run this many images through the FP32 model "
                                        "and report drifting detections (with --precision fp16|int8)."),
    calib_images: int = typer.Option(64, min=1, help="INT8: calibration images drawn from DATASET_DIR."),
    cache_dir: Optional[Path] = typer.Option(None, help="Prepared models and TensorRT engines "
                                             "(default: $BULKDET_CACHE_DIR or ~/.cache/bulkdet)."),
    hw_decoder_load: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="GPU: share of JPEGs for the "
                                                    "hardware JPEG decoder (DALI's default when unset)."),
    nms_in_model: bool = typer.Option(False, help="Append NMS to the model (YOLOv8 layout): only final "
                                      "detections leave the engine."),
):
    """Detect objects in every image of DATASET_DIR; write Parquet to --out."""
    from bulkdet.run.runner import RunConfig, run as do_run
    from bulkdet.store.parts import ConfigMismatch

    _setup_logging(quiet)
    for name, value, allowed in (("device", device, ("auto", "cpu", "gpu")),
                                 ("backend", backend, ("auto", "onnxruntime", "tensorrt")),
                                 ("precision", precision, ("fp32", "fp16", "int8"))):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=f"--{name}")
    cfg = RunConfig(dataset_dir, model, out, device, backend, imgsz, max_batch, conf, iou, max_det, names,
                    precision, overwrite, dali_threads, infer_threads, quiet=quiet,
                    commit_images=commit_every, retry_failed=retry_failed,
                    check_precision=check_precision, calib_images=calib_images, cache_dir=cache_dir,
                    hw_decoder_load=hw_decoder_load, nms_in_model=nms_in_model,
                    pixel_budget=pixel_budget, decode_budget=decode_budget, infer_workers=infer_workers)
    if not use_ray and (ray_address or workers):
        raise typer.BadParameter("needs --ray", param_hint="--ray-address/--workers")
    try:
        if use_ray:
            from bulkdet.run.distributed import run_on_ray

            s = run_on_ray(cfg, ray_address, workers)
        else:
            s = do_run(cfg)
    except ConfigMismatch as exc:  # the command conflicts with what --out holds: a usage error
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR)
    typer.echo(f"{s.images} images ({s.processed} processed now), {s.detections} detections, "
               f"{s.failed} failed, in {s.wall_s:.1f} s -> {out}")
    if s.precision_check:
        typer.echo(s.precision_check)
    if s.fallback_decoded or s.oom_splits:
        typer.echo(f"{s.fallback_decoded} image(s) decoded by the CPU fallback; "
                   f"{s.oom_splits} batch(es) split after running out of memory")
    if s.failed:
        typer.echo(f"{s.failed} input(s) failed: {s.by_status}. List them with:\n"
                   f"  duckdb -c \"SELECT path, status, error FROM '{out}/images/*.parquet' WHERE status <> 'ok'\"")
        raise typer.Exit(EXIT_FAILED_INPUTS)


@app.command()
def prepare(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="FP32 ONNX detector."),
    precision: str = typer.Option(..., help="fp16 | int8"),
    calib: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                         help="INT8: dataset (from `bulkdet pack`) to calibrate on."),
    calib_images: int = typer.Option(64, min=1, help="INT8: images drawn from --calib."),
    imgsz: int = typer.Option(640, help="INT8: input size for dynamic-shape models (use the run's)."),
    seed: int = typer.Option(0, help="INT8: seed of the calibration draw."),
    target: str = typer.Option("gpu", help="INT8: gpu = symmetric int8 (TensorRT; also runs on the CPU), "
                               "cpu = uint8 activations (faster and closer to FP32 on x86 ONNX Runtime)."),
    out: Optional[Path] = typer.Option(None, "--out", dir_okay=False, help="Also copy the prepared model here."),
    cache_dir: Optional[Path] = typer.Option(None, help="Default: $BULKDET_CACHE_DIR or ~/.cache/bulkdet."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Make the FP16 or INT8 (Q/DQ, calibrated) ONNX of MODEL; cached, reused by `run --precision`."""
    from bulkdet.model.precision import Calibration, export_prepared, prepare_model

    _setup_logging(quiet)
    if precision not in ("fp16", "int8"):
        raise typer.BadParameter(f"{precision!r} is not one of fp16, int8", param_hint="--precision")
    if precision == "int8" and calib is None:
        raise typer.BadParameter("int8 needs calibration images: --calib DATASET_DIR", param_hint="--calib")
    if target not in ("gpu", "cpu"):
        raise typer.BadParameter(f"{target!r} is not one of gpu, cpu", param_hint="--target")
    calibration = Calibration(calib, calib_images, seed, imgsz, target) if precision == "int8" else None
    try:
        prepared = prepare_model(model, precision, calibration, cache_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR)
    path = export_prepared(prepared, out) if out else prepared.path
    typer.echo(f"{precision} model {'from the cache' if prepared.cached else 'prepared'}: {path}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., exists=True, file_okay=False, metavar="RUN_DIR",
                                          help="A run folder, or two to compare side by side."),
    html: Optional[Path] = typer.Option(None, "--html", dir_okay=False,
                                        help="Also write one self-contained HTML page with plots and samples."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the comparison) as JSON."),
):
    """Summarise a run: throughput, where the time went, padding, failures, detections per class."""
    from bulkdet.results.report import compare, print_compare, print_report, summarize

    if len(run_dirs) > 2:
        raise typer.BadParameter("give one run folder, or two to compare", param_hint="RUN_DIR")
    if html is not None and len(run_dirs) != 1:
        raise typer.BadParameter("--html takes one run folder", param_hint="--html")
    try:
        if as_json:
            s = summarize(run_dirs[0]) if len(run_dirs) == 1 else compare(*map(summarize, run_dirs))
            typer.echo(json.dumps(s, indent=2, default=str))
        elif len(run_dirs) == 1:
            print_report(run_dirs[0])
        else:
            print_compare(*run_dirs)
        if html is not None:
            from bulkdet.results.html_report import write_html

            typer.echo(f"HTML report: {write_html(run_dirs[0], html)}", err=as_json)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR)


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """What this machine can do: DALI, GPUs, ONNX Runtime providers, TensorRT, and why not."""
    from bulkdet.system.info import print_info, probe

    if as_json:
        typer.echo(json.dumps(probe(), indent=2, default=str))
    else:
        print_info()


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the demo's data and results.")):
    """Generate synthetic images and an analytic detector, then pack, run and report."""
    from bulkdet.demo import build_analytic_detector, compare_with_truth, make_demo_images
    from bulkdet.ingest.pack import pack as do_pack
    from bulkdet.results.report import print_report
    from bulkdet.run.runner import RunConfig, run as do_run
    from bulkdet.store.parts import read_detections

    _setup_logging(False)
    truth = make_demo_images(out / "images", n=48, truth_path=out / "truth.json")
    model = build_analytic_detector(out / "analytic-rgb.onnx")
    typer.echo(f"demo: {len(truth)} synthetic images and an analytic red/green/blue rectangle detector in {out}")
    do_pack(out / "images", out / "dataset")
    do_run(RunConfig(out / "dataset", model, out / "run", overwrite=True))
    print_report(out / "run")
    problems = compare_with_truth(truth, read_detections(out / "run").to_pylist())
    n_rects = sum(len(t["rects"]) for t in truth)
    if problems:
        typer.echo(f"demo: {len(problems)} problem(s) against the known truth:\n  " + "\n  ".join(problems[:20]))
        raise typer.Exit(EXIT_ERROR)
    typer.echo(f"demo: all {n_rects} rectangles found with the right class and corners within tolerance, "
               f"no extra boxes. Results: {out / 'run'}")


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Run folder made by `bulkdet run`."),
    fmt: str = typer.Option(..., "--format", help="megadetector | coco | labelstudio | yolo | csv"),
    out: Path = typer.Option(..., "--out", help="File to write (a folder for yolo)."),
    conf: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Keep detections scoring at least this "
                                         "(default: all the run kept)."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="Keep these classes (names or ids; "
                                                "repeat or comma-separate)."),
    image_root: Optional[str] = typer.Option(None, help="labelstudio: prefix of each task's image "
                                             "(e.g. /data/local-files/?d=photos/)."),
    overwrite: bool = typer.Option(False, help="Replace what is at --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
):
    """Write a run's detections as MegaDetector JSON, COCO, Label Studio tasks, YOLO txt or CSV."""
    from bulkdet.results.export import FORMATS, export
    from bulkdet.results.stream import UsageError

    _setup_logging(quiet)
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="--format")
    if image_root is not None and fmt != "labelstudio":
        raise typer.BadParameter("only for --format labelstudio", param_hint="--image-root")
    try:
        s = export(run_dir, fmt, out, conf, classes, image_root, overwrite, quiet)
    except UsageError as exc:  # --out taken, an unknown class
        _fail(exc, EXIT_USAGE)
    except (OSError, RuntimeError) as exc:  # FileNotFoundError: not a run folder
        _fail(exc, EXIT_ERROR)
    typer.echo(f"{s.images} images, {s.detections} detections -> {s.out} ({fmt})")


@app.command("crops")
def crops_cmd(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Run folder made by `bulkdet run`."),
    out: Path = typer.Option(..., "--out", help="Folder for the crops (a subfolder per class) and crops.parquet."),
    conf: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Crop detections scoring at least this."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="Crop these classes (names or ids; "
                                                "repeat or comma-separate)."),
    pad: float = typer.Option(0.0, min=0.0, help="Margin on each side: pixels (>= 1) or a fraction of the "
                              "box's side (< 1)."),
    min_size: int = typer.Option(0, min=0, help="Skip boxes whose shorter side is under this many pixels."),
    square: bool = typer.Option(False, help="Widen the shorter side to make square crops (within the image)."),
    dataset: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                           help="The dataset the run read, if it moved (default: from run.json)."),
    overwrite: bool = typer.Option(False, help="Rewrite every crop, and write into a folder bulkdet did not fill."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
):
    """Cut each detection out of its image into OUT/CLASS/*.jpg, indexed by OUT/crops.parquet."""
    from bulkdet.results.crops import crops
    from bulkdet.results.stream import UsageError

    _setup_logging(quiet)
    try:
        s = crops(run_dir, out, conf, classes, pad, min_size, square, dataset, overwrite, quiet)
    except UsageError as exc:
        _fail(exc, EXIT_USAGE)
    except (OSError, RuntimeError) as exc:
        _fail(exc, EXIT_ERROR)
    typer.echo(f"{s.crops} crops in {s.out} ({s.written} written, {s.skipped} already there) "
               f"from {s.images_decoded} decoded images"
               + (f"; {s.failed_images} image(s) could not be read" if s.failed_images else ""))
    if s.failed_images:
        raise typer.Exit(EXIT_FAILED_INPUTS)


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Run folder made by `bulkdet run`."),
    labels: Path = typer.Option(..., "--labels", exists=True, help="COCO ground-truth JSON, or a YOLO labels folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Score a run against labels: COCO mAP@[.5:.95], mAP@.5, per-class AP and recall (pycocotools)."""
    from bulkdet.results.evaluate import evaluate
    from bulkdet.results.report import print_eval
    from bulkdet.results.stream import UsageError

    try:
        result = evaluate(run_dir, labels)
    except UsageError as exc:
        _fail(exc, EXIT_USAGE)
    except (OSError, RuntimeError) as exc:
        _fail(exc, EXIT_ERROR)
    if as_json:
        curves = ("recall_thresholds", "pr50")  # in RUN/eval.json, for the report's plots
        per_class = {k: {f: v for f, v in c.items() if f not in curves} for k, c in result["per_class"].items()}
        typer.echo(json.dumps({**{k: v for k, v in result.items() if k not in curves}, "per_class": per_class},
                              indent=2))
    else:
        print_eval(result)


def _fail(exc: Exception, code: int):
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
