"""The `bulkdet` command line: parses options and calls one function per command.

Every option's value is checked here, when the command line is parsed (ranges: bulkdet/choices.py),
and every error ends as one `error:` line with the exit code of docs/commands.md; the traceback
of an unexpected error only with `bulkdet --debug COMMAND`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from bulkdet.choices import (IMGSZ_MAX, IMGSZ_MIN, MAX_BATCH, MAX_DET, MAX_THREADS, SHARD_MB_MAX, SHARD_MB_MIN,
                             TILE_MAX, TILE_MIN, TILE_OVERLAP_MAX, Backend, Channels, Device, InputScale, Int8Target,
                             Layout, Precision, TileMatch, TileMerge)
from bulkdet.ingest.imageinfo import DEFAULT_MAX_PIXELS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_INPUTS = 0, 1, 2, 3

log = logging.getLogger("bulkdet")


class _Commands(TyperGroup):
    """The command group, with bulkdet's error output: one `error:` line, never a traceback.

    typer.TyperException is the base of every usage error typer raises (a bad value, an unknown
    option, a missing argument) and of typer.BadParameter raised by the commands themselves.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `bulkdet` alone: the help, as usual
                typer.echo(exc.format_message(), err=True)
            else:
                typer.echo(_error_line(exc), err=True)
            code = exc.exit_code
        except typer.Abort:  # end of input at a prompt
            typer.echo("error: aborted", err=True)
            code = EXIT_ERROR
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug, or a failure no message was written for yet
            if ctx.params.get("debug"):
                raise
            text = str(exc).strip()
            typer.echo(f"error: {type(exc).__name__}{': ' + text.splitlines()[0] if text else ''} "
                       f"(unexpected: `bulkdet --debug {ctx.invoked_subcommand or 'COMMAND'} ...` shows where)",
                       err=True)
            raise typer.Exit(EXIT_ERROR) from None


def _error_line(exc: typer.TyperException) -> str:
    """A usage error as one line, with the option's range when it has one: "error: invalid value
    for '--imgsz': Input should be greater than or equal to 32 (allowed: 32<=x<=8192; see ...)"."""
    message = " ".join(exc.format_message().replace("Value error, ", "").split())
    param, ctx = getattr(exc, "param", None), getattr(exc, "ctx", None)
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    notes = []
    if low is not None or high is not None:
        notes.append("allowed: " + (f"{low}<=" if low is not None else "") + "x"
                     + (f"<={high}" if high is not None else ""))
    if ctx is not None:
        notes.append(f"see `{ctx.command_path} --help`")
    return f"error: {message[:1].lower()}{message[1:]}" + (f" ({'; '.join(notes)})" if notes else "")


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Offline bulk object detection: pack images into shards, run a detector, report.")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an unexpected error.")):
    """Offline bulk object detection: pack images into shards, run a detector, report."""


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever sys.stderr is when a line is written (see _quiet_native_output)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="bulkdet: %(message)s",
                        handlers=[_StderrHandler()])


@contextlib.contextmanager
def _quiet_native_output(quiet: bool):
    """With -q, what C/C++ libraries print themselves to stderr (DALI's nvImageCodec "[ERROR] ..."
    lines for an image it cannot decode, libjpeg's "Corrupt JPEG data") goes to /dev/null: bulkdet
    reports each failure in its row. Python's own output (the summary, `error:` lines) still prints.
    nvImageCodec prints errors at any DALI_NVIMGCODEC_LOG_LEVEL, so only the file descriptor can."""
    if not quiet:
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    try:
        if _fileno(python_stderr) == 2:  # Python's stderr writes on, through a copy of the real one
            sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding,
                                   errors=python_stderr.errors)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _check_model(model: Path, names: Path | None, imgsz: int | None, param_hint: str = "'--model'",
                 layout: str | None = None, classes_kept: list[str] | None = None):
    """The model (and --names, --classes) read before anything is written: a file that is no ONNX
    detector, or names that do not fit its output, is a bad option value (exit 2), not a failed run.
    `imgsz`: warn once when it is rounded up to the model's stride (None: not used).
    Returns what was read (ModelInfo, with --names' names), so that the command reads and hashes
    the model once; None for a TensorRT engine (read on the GPU when the run starts)."""
    from bulkdet.model.info import (UnknownClass, check_names_fit, class_ids, is_engine_file, load_model_info,
                                    model_input_hw, read_names_file)

    if is_engine_file(model):
        return None  # read by TensorRT when the run starts (on the GPU)
    try:
        info = load_model_info(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=param_hint) from None
    classes = info.names
    if names is not None:
        try:
            classes = read_names_file(names)
            check_names_fit(classes, info.outputs, info.end2end, f"class names file {names}")
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--names'") from None
    try:
        class_ids(classes_kept, classes)
    except UnknownClass as exc:
        raise typer.BadParameter(str(exc), param_hint="'--classes'") from None
    from bulkdet.model.layouts import LayoutError, detect

    nc = len(classes)
    try:  # outputs that fit no layout (or not --layout): told now where their declared shapes tell
        detect(info.outputs, nc or None, info.end2end, layout or info.layout_hint)
    except LayoutError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--layout'" if layout else param_hint) from None
    if imgsz is not None and info.fixed_shape is None and imgsz % info.stride:
        log.warning("--imgsz %d is not a multiple of the model's stride %d: using %d (as Ultralytics does)",
                    imgsz, info.stride, model_input_hw(imgsz, info.stride)[0])
    return dataclasses.replace(info, names=classes)


_STORAGE_OPTIONS_HELP = ("fsspec options for an object store, e.g. '{\"endpoint_url\": \"http://...\"}' "
                         "(default: the backend's environment variables).")


def _storage_options(text: str | None) -> dict | None:
    """--storage-options (pack, and the readers of a dataset): a JSON object of fsspec options, or a bad
    option value (exit 2)."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="'--storage-options'") from None
    if not isinstance(options, dict):
        raise typer.BadParameter("give a JSON object, e.g. '{\"anon\": true}'", param_hint="'--storage-options'")
    return options


# --storage-options of the commands that read a dataset's bytes (run, crops, report --html).
_DATASET_STORAGE_OPTIONS = typer.Option(None, "--storage-options", metavar="JSON", help="A dataset packed "
                                        "--reference from a URL: " + _STORAGE_OPTIONS_HELP + " Not part of "
                                        "the run's settings; never written.")


def _dataset_storage_options(text: str | None, dataset_dir: Path | None) -> dict | None:
    """_DATASET_STORAGE_OPTIONS parsed, and refused (exit 2) for a dataset whose bytes are read from
    no object store. A dataset that is not there (None, or moved) is not judged: the command says so."""
    from bulkdet.store.readers import reads_url

    options = _storage_options(text)
    if options is not None and dataset_dir is not None and Path(dataset_dir).exists() and not reads_url(dataset_dir):
        raise typer.BadParameter(f"{dataset_dir} reads no object store (it was not packed --reference from a URL): "
                                 "run without it", param_hint="'--storage-options'")
    return options


def _check_writable(path: Optional[Path], param_hint: str, folder: bool = False) -> None:
    """A path bulkdet will write (a file, or a folder with `folder`), checked before any work: the
    nearest part of it that exists must be a folder we may write in (exit 2 otherwise)."""
    if path is None:
        return
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise typer.BadParameter(f"{path}: {existing} is a file, not a folder", param_hint=param_hint)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{path}: no permission to write in {existing}", param_hint=param_hint)


# The model input's normalisation: options of `run` and `prepare` (INT8 calibrates on normalised images).
_INPUT_SCALE = typer.Option(None, "--input-scale", help="The model's pixel range before --mean/--std: 1 (0..1) "
                            "or 255 (0..255). Default: the model's metadata, else 1. See docs/models.md.")
_MEAN = typer.Option(None, "--mean", metavar="R,G,B", help="Subtracted from each channel, in --input-scale units "
                     "and the model's channel order (e.g. 0.485,0.456,0.406), or 'imagenet'. Default: the "
                     "model's metadata, else 0.")
_STD = typer.Option(None, "--std", metavar="R,G,B", help="Divides each channel after --mean, in --input-scale units "
                    "and the model's channel order (e.g. 0.229,0.224,0.225), or 'imagenet'. Default: the model's "
                    "metadata, else 1.")
_CHANNELS = typer.Option(None, "--channels", help="The model input's channel order: rgb, or bgr (OpenCV-trained "
                         "models, YOLOX). Default: the model's metadata, else rgb.")


def _input_norm(scale: Optional[InputScale], mean: Optional[str], std: Optional[str],
                channels: Optional[Channels] = None):
    """The normalisation the command line gives (None: none of its options, the model's metadata
    decides); a bad value is a usage error naming its option."""
    if scale is None and mean is None and std is None and channels is None:
        return None
    from bulkdet.model.info import parse_norm

    scale = scale.value if scale else None
    for option, given in (("mean", mean), ("std", std)):
        try:
            parse_norm(scale, channels=channels, **{option: given})
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=f"'--{option}'") from None
    return parse_norm(scale, mean, std, channels)


@app.command()
def pack(
    src: str = typer.Argument(..., help="What to pack: a folder (walked recursively), a text file listing paths "
                              "(one per line, relative to its folder), a tar archive (.tar, .tar.gz, .tgz), or a URL "
                              "(s3://bucket/prefix, gs://, az://)."),
    out: Path = typer.Option(..., "--out", help="Dataset folder to create or extend."),
    shard_size_mb: float = typer.Option(1024, min=SHARD_MB_MIN, max=SHARD_MB_MAX,
                                        help="Target size of one LMDB shard (MB; fractions allowed). With "
                                        "--reference: the source bytes per unit of work (pseudo-shard)."),
    follow_symlinks: bool = typer.Option(False, help="Follow symbolic links (loops are detected)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, min=1, help="Larger images get status too_large."),
    reference: bool = typer.Option(False, "--reference", help="Store no image bytes: paths, sizes, hashes and "
                                   "headers only; `run` reads each image from SRC and checks its hash."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", metavar="JSON",
                                                  help="For a URL: " + _STORAGE_OPTIONS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
):
    """Store every image of SRC, bytes unchanged, in LMDB shards plus a manifest (or, with
    --reference, only the manifest: see docs/inputs.md).

    Again into the same --out: new files are added, changed ones get a new row, deleted ones
    are marked (see docs/reliability.md).
    """
    from bulkdet.ingest.pack import PackUsageError, pack as do_pack
    from bulkdet.store.lock import FolderInUse
    from bulkdet.store.readers import MissingExtra, is_url

    options = _storage_options(storage_options)
    if not is_url(src) and not Path(src).exists():
        raise typer.BadParameter(f"{src} does not exist", param_hint="'SRC'")
    _setup_logging(quiet)
    try:
        with _quiet_native_output(quiet):
            s = do_pack(src, out, shard_size_mb, follow_symlinks, max_pixels, quiet=quiet, reference=reference,
                        storage_options=options)
    except (FolderInUse, PackUsageError, MissingExtra) as exc:  # --out busy or the source itself; a missing extra
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except (OSError, RuntimeError) as exc:  # e.g. disk full: committed shards are kept and reused
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR)
    typer.echo(pack_summary_line(s, out, reference))


def pack_summary_line(s, out: Path, reference: bool = False) -> str:
    """What a pack did, in one line (and a warning line when the source folder changed)."""
    from bulkdet.store.manifest import PROCESSED_STATUSES

    not_usable = {st: n for st, n in s.by_status.items() if st not in PROCESSED_STATUSES}
    if reference:
        parts = [f"packed {s.new} new files by reference ({s.found} in all, {s.read_bytes / 1e6:.1f} MB read and "
                 f"hashed, none stored) into {s.shards} pseudo-shard(s) in {out}"]
    else:
        parts = [f"packed {s.new} new files ({s.found} in all, {s.duplicates} duplicate contents stored once, "
                 f"{s.stored_bytes / 1e6:.1f} MB stored) into {s.shards} shard(s) in {out}"]
    if s.changed or s.deleted or s.unchanged:
        parts.append(f"{s.changed} changed (new rows), {s.deleted} deleted"
                     + (f" ({s.renamed} renamed)" if s.renamed else "") + f", {s.unchanged} unchanged"
                     + (f" ({s.restored} stored again)" if s.restored else ""))
    if s.by_status.get("corrupt"):
        parts.append(f"{s.by_status['corrupt']} corrupt (stored and run; reasons in the manifest)")
    if not_usable:
        parts.append(f"{sum(not_usable.values())} not usable: {not_usable}")
    if s.notes.folder_links:
        parts.append(f"{len(s.notes.folder_links)} link(s) to folders not followed (--follow-symlinks)")
    if s.notes.bulkdet_folders:
        parts.append(f"bulkdet folders not packed: {', '.join(s.notes.bulkdet_folders)}")
    line = "; ".join(parts)
    if s.previous_source:
        line = (f"warning: the last pack into {out} read {s.previous_source}: the dataset now mirrors this "
                f"source (files only in the other one are marked deleted)\n{line}")
    return line


@app.command()
def run(
    ctx: typer.Context,
    dataset_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Dataset made by `bulkdet pack`."),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="Detector (.onnx)."),
    out: Path = typer.Option(..., "--out", help="Run folder (created; an existing one is resumed)."),
    device: Device = typer.Option(Device.AUTO, help="Where to decode and infer (auto: the GPU when usable)."),
    backend: Backend = typer.Option(Backend.AUTO, help="Inference engine (auto: TensorRT when usable)."),
    imgsz: int = typer.Option(640, min=IMGSZ_MIN, max=IMGSZ_MAX, help="Model input size (long side) for "
                              "dynamic-shape models; rounded up to the model's stride."),
    max_batch: int = typer.Option(32, min=1, max=MAX_BATCH, help="Most images in one batch."),
    conf: float = typer.Option(0.25, min=0.0, max=1.0, help="Score threshold."),
    iou: float = typer.Option(0.45, min=0.0, max=1.0, help="NMS IoU threshold."),
    max_det: int = typer.Option(300, min=1, max=MAX_DET, help="Most detections kept per image."),
    names: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Class names file (one per line, or JSON)."),
    precision: Precision = typer.Option(Precision.FP32, help="fp16 / int8: a prepared model (see `prepare`)."),
    overwrite: bool = typer.Option(False, help="Replace a previous run in --out made with other settings."),
    dali_threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="DALI CPU threads "
                                               "(default: a sixth of the cores on CPU, all on GPU)."),
    infer_threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="ONNX Runtime intra-op "
                                                "threads per batch (default: cores / workers)."),
    infer_workers: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="Batches inferred at once "
                                                "(default: min(cores, 4) on CPU, 1 on GPU)."),
    pixel_budget: Optional[int] = typer.Option(
        None, min=1, help="Most input pixels (padded) in one batch (default: two 640x640 inputs on CPU, --max-batch on GPU)."),
    decode_budget: Optional[int] = typer.Option(
        None, min=1, help="Most original pixels decoded at once; bigger batches are split (default: 64e6)."),
    commit_every: int = typer.Option(4096, min=1, help="Commit a Parquet part every N images: what a kill can cost."),
    retry_failed: bool = typer.Option(False, help="Process again the images whose status is not ok."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
    storage_options: Optional[str] = _DATASET_STORAGE_OPTIONS,
    use_ray: bool = typer.Option(False, "--ray", help="Spread the shards over a Ray cluster (needs bulkdet[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: RAY_ADDRESS, or a local one)."),
    workers: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS,
                                          help="Ray workers (default: one per GPU, or one per machine)."),
    check_precision: int = typer.Option(0, min=0, help="Also run this many images through the FP32 model "
                                        "and report drifting detections (with --precision fp16|int8)."),
    calib_images: int = typer.Option(64, min=1, help="INT8: calibration images drawn from DATASET_DIR."),
    cache_dir: Optional[Path] = typer.Option(None, help="Prepared models and TensorRT engines "
                                             "(default: $BULKDET_CACHE_DIR or ~/.cache/bulkdet)."),
    hw_decoder_load: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                    help="GPU: share of JPEGs for the "
                                                    "hardware JPEG decoder (DALI's default when unset)."),
    nms_in_model: bool = typer.Option(False, help="Append NMS to the model (YOLOv8 layout): only final "
                                      "detections leave the engine."),
    layout: Optional[Layout] = typer.Option(None, help="The model's output layout, when its outputs do not "
                                            "tell it (see docs/models.md; default: told by the outputs)."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="Keep only these classes (names or ids "
                                                "of the model's; repeat or comma-separate, e.g. person,car)."),
    tile: int = typer.Option(0, min=0, max=TILE_MAX, help="Sliced inference: cut images larger than SIZE "
                             "original pixels into SIZE x SIZE tiles (0: off). See docs/tiling.md."),
    tile_overlap: float = typer.Option(0.2, min=0.0, max=TILE_OVERLAP_MAX, help="Share of a tile its "
                                       "neighbour overlaps."),
    tile_full: bool = typer.Option(True, help="With --tile: also run the whole image, letterboxed "
                                   "(finds the objects larger than a tile)."),
    tile_merge: TileMerge = typer.Option(TileMerge.NMM, help="Merge an image's tile boxes: nmm (matching "
                                         "boxes become their union) or nms (matching boxes dropped)."),
    tile_match: TileMatch = typer.Option(TileMatch.IOS, help="Boxes match by intersection over the "
                                         "smaller box (ios) or over the union (iou)."),
    tile_match_threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="Boxes match above this overlap."),
    input_scale: Optional[InputScale] = _INPUT_SCALE,
    mean: Optional[str] = _MEAN,
    std: Optional[str] = _STD,
    channels: Optional[Channels] = _CHANNELS,
):
    """Detect objects in every image of DATASET_DIR; write Parquet to --out."""
    from bulkdet.run.model_errors import ModelRunError
    from bulkdet.run.runner import RunConfig, run as do_run
    from bulkdet.run.tiles import TileSettings
    from bulkdet.store.lock import FolderInUse
    from bulkdet.store.run_folder import RunFolderRefused
    from bulkdet.model.layouts import LayoutError
    from bulkdet.model.info import UnknownClass

    if 0 < tile < TILE_MIN:
        raise typer.BadParameter(f"{tile} is below {TILE_MIN} pixels (0 turns tiling off)", param_hint="'--tile'")
    if not use_ray and (ray_address or workers):
        raise typer.BadParameter("needs --ray", param_hint="'--ray-address' / '--workers'")
    options = _dataset_storage_options(storage_options, dataset_dir)
    _check_writable(cache_dir, "'--cache-dir'", folder=True)
    norm = _input_norm(input_scale, mean, std, channels)
    _setup_logging(quiet)
    checked = _check_model(model, names, imgsz, layout=layout.value if layout else None, classes_kept=classes)
    cfg = RunConfig(dataset_dir, model, out, device=device.value, backend=backend.value, imgsz=imgsz,
                    max_batch=max_batch, conf=conf, iou=iou, max_det=max_det, names=names,
                    precision=precision.value, overwrite=overwrite,
                    dali_threads=dali_threads, infer_threads=infer_threads, quiet=quiet,
                    commit_images=commit_every, retry_failed=retry_failed,
                    precision_check_images=check_precision, calib_images=calib_images, cache_dir=cache_dir,
                    hw_decoder_load=hw_decoder_load, nms_in_model=nms_in_model,
                    pixel_budget=pixel_budget, decode_budget=decode_budget, infer_workers=infer_workers,
                    layout=layout.value if layout else None,
                    tiles=TileSettings(tile, tile_overlap, tile_full, tile_merge.value, tile_match.value,
                                       tile_match_threshold), classes=classes or None, storage_options=options, norm=norm)
    try:
        with _quiet_native_output(quiet):
            if use_ray:
                from bulkdet.run.distributed import run_on_ray

                s = run_on_ray(cfg, ray_address, workers, source=checked)
            else:
                s = do_run(cfg, source=checked)
    except (RunFolderRefused, FolderInUse, LayoutError, UnknownClass) as exc:  # a conflict with --out, a model no
        # layout fits, a --classes a TensorRT engine's names lack
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, ModelRunError) and ctx.find_root().params.get("debug"):
            raise  # --debug: where the engine failed, with the traceback
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
    precision: Precision = typer.Option(..., help="fp16 or int8 (fp32 is the model itself)."),
    calib: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                         help="INT8: dataset (from `bulkdet pack`) to calibrate on."),
    calib_images: int = typer.Option(64, min=1, help="INT8: images drawn from --calib."),
    imgsz: int = typer.Option(640, min=IMGSZ_MIN, max=IMGSZ_MAX,
                              help="INT8: input size for dynamic-shape models (use the run's)."),
    seed: int = typer.Option(0, min=0, help="INT8: seed of the calibration draw."),
    target: Int8Target = typer.Option(Int8Target.GPU, help="INT8: gpu = symmetric int8 (TensorRT; also runs on "
                                      "the CPU), cpu = uint8 activations (faster and closer to FP32 on x86 "
                                      "ONNX Runtime)."),
    out: Optional[Path] = typer.Option(None, "--out", dir_okay=False, help="Also copy the prepared model here."),
    cache_dir: Optional[Path] = typer.Option(None, help="Default: $BULKDET_CACHE_DIR or ~/.cache/bulkdet."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    input_scale: Optional[InputScale] = _INPUT_SCALE,
    mean: Optional[str] = _MEAN,
    std: Optional[str] = _STD,
    channels: Optional[Channels] = _CHANNELS,
):
    """Make the FP16 or INT8 (Q/DQ, calibrated) ONNX of MODEL; cached, reused by `run --precision`."""
    from bulkdet.model.precision import Calibration, export_prepared, prepare_model
    from bulkdet.run.calibration import decoded_batches

    if precision is Precision.FP32:
        raise typer.BadParameter("fp32 is the model itself: prepare fp16 or int8", param_hint="'--precision'")
    if precision is Precision.INT8 and calib is None:
        raise typer.BadParameter("int8 needs calibration images: --calib DATASET_DIR", param_hint="'--calib'")
    _check_writable(out, "'--out'")
    _check_writable(cache_dir, "'--cache-dir'", folder=True)
    norm = _input_norm(input_scale, mean, std, channels)
    _setup_logging(quiet)
    checked = _check_model(model, None, imgsz if precision is Precision.INT8 else None, param_hint="'MODEL'")
    calibration = (Calibration(calib, calib_images, seed, imgsz, target.value, norm=norm, feed=decoded_batches)
                   if precision is Precision.INT8 else None)
    try:
        with _quiet_native_output(quiet):
            prepared = prepare_model(model, precision.value, calibration, cache_dir, checked and checked.sha256)
        path = export_prepared(prepared, out) if out else prepared.path
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. --out or --cache-dir not writable
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR)
    typer.echo(f"{precision} model {'from the cache' if prepared.cached else 'prepared'}: {path}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., exists=True, file_okay=False, metavar="RUN_DIR",
                                          help="A run folder, or two to compare side by side."),
    html: Optional[Path] = typer.Option(None, "--html", dir_okay=False,
                                        help="Also write one self-contained HTML page with plots and samples."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the comparison) as JSON."),
    storage_options: Optional[str] = _DATASET_STORAGE_OPTIONS,
):
    """Summarise a run: throughput, where the time went, padding, failures, detections per class."""
    from bulkdet.results.report import compare, print_compare, print_report, summarize
    from bulkdet.store.parts import BrokenPart

    if len(run_dirs) > 2:
        raise typer.BadParameter("give one run folder, or two to compare", param_hint="'RUN_DIR'")
    if html is not None and len(run_dirs) != 1:
        raise typer.BadParameter("--html takes one run folder", param_hint="'--html'")
    _check_writable(html, "'--html'")
    if storage_options is not None and html is None:
        raise typer.BadParameter("only --html reads the dataset (its sample images): give --html too, or leave it "
                                 "out", param_hint="'--storage-options'")
    try:
        options = None
        if storage_options is not None:
            from bulkdet.results.html_report import dataset_of
            from bulkdet.store.parts import read_run_json

            options = _dataset_storage_options(storage_options, dataset_of(read_run_json(run_dirs[0])))
        if as_json:
            s = summarize(run_dirs[0]) if len(run_dirs) == 1 else compare(*map(summarize, run_dirs))
            typer.echo(json.dumps(s, indent=2, default=str))
        elif len(run_dirs) == 1:
            print_report(run_dirs[0])
        else:
            print_compare(*run_dirs)
        if html is not None:
            from bulkdet.results.html_report import write_html

            typer.echo(f"HTML report: {write_html(run_dirs[0], html, options)}", err=as_json)
    except (OSError, BrokenPart) as exc:  # no run.json, a damaged part, a disk error while writing --html
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
def demo(out: Path = typer.Option(Path("demo-out"), "--out", file_okay=False,
                                  help="Folder for the demo's data and results.")):
    """Generate synthetic images and an analytic detector, then pack, run and report."""
    from bulkdet.demo import run_demo

    _setup_logging(False)
    if run_demo(out, typer.echo):
        raise typer.Exit(EXIT_ERROR)


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
    from bulkdet.results.run_info import UsageError

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
    device: Device = typer.Option(Device.AUTO, help="Where DALI decodes and cuts (auto: the GPU when DALI "
                                  "can decode there)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines (for scripts)."),
    storage_options: Optional[str] = _DATASET_STORAGE_OPTIONS,
):
    """Cut each detection out of its image into OUT/CLASS/*.jpg, indexed by OUT/crops.parquet."""
    from bulkdet.results.crops import crops
    from bulkdet.results.run_info import RunInfo, UsageError

    _setup_logging(quiet)
    try:
        options = None if storage_options is None else _dataset_storage_options(
            storage_options, RunInfo.load(run_dir).dataset(dataset))
        s = crops(run_dir, out, conf, classes, pad, min_size, square, dataset, overwrite, quiet,
                  device=device.value, storage_options=options)
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
    from bulkdet.results.run_info import UsageError

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
