"""`bulkdet export`: a run's detections in the formats other tools read.

megadetector (MegaDetector batch output 1.x: Timelapse, AddaxAI...), coco (pycocotools,
FiftyOne), labelstudio (pre-annotations), yolo (one txt per image, with confidences) and csv.
Every format streams from the Parquet parts one part at a time (memory does not grow with the
run) and appears only complete: a single file is written to a temporary name and renamed; the
YOLO folder's files each likewise. The field rules are in docs/export.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from bulkdet.results.run_info import RunInfo, UsageError
from bulkdet.store.parts import PartResults, RESULT_STATUSES, count_images, iter_images, iter_parts
from bulkdet.run.progress import Progress
from bulkdet.store.atomic import open_atomic

FORMATS = ("megadetector", "coco", "labelstudio", "yolo", "csv")
MEGADETECTOR_FORMAT_VERSION = "1.4"  # has `failure` rows and `detector_metadata`
CSV_COLUMNS = ["path", "image_id", "class_id", "class_name", "score", "x1", "y1", "x2", "y2", "width", "height"]
# Label Studio: the names of the <RectangleLabels> and <Image> tags of the labeling config.
LS_FROM_NAME, LS_TO_NAME = "label", "image"
ROWS_AT_ONCE = 256  # images turned into Python values at a time


class OutputExists(UsageError):
    """The output path holds something and the user did not consent to replacing it."""


def refuse_existing(out: Path, folder: bool, overwrite: bool) -> None:
    """Never replace what is at `out` without --overwrite; a folder output may be an empty folder."""
    if not out.exists():
        return
    if folder != out.is_dir():
        raise OutputExists(f"{out} exists and is {'a folder' if out.is_dir() else 'a file'}; "
                           f"give a {'folder' if folder else 'file'} path for --out")
    if overwrite or (folder and not any(out.iterdir())):
        return
    raise OutputExists(f"{out} already exists; use --overwrite to replace it, or another --out")


@dataclass
class ExportSummary:
    out: Path
    images: int
    detections: int


def export(run_dir: Path, fmt: str, out: Path, conf: float | None = None, classes: list[str] | None = None,
           image_root: str | None = None, overwrite: bool = False, quiet: bool = False) -> ExportSummary:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    info = RunInfo.load(run_dir)
    class_ids = info.class_ids(classes)
    out = Path(out)
    refuse_existing(out, folder=fmt == "yolo", overwrite=overwrite)
    progress = Progress(count_images(run_dir), desc=f"export {fmt}", unit="img", quiet=quiet)
    counts = ExportSummary(out, 0, 0)

    def parts() -> Iterator[PartResults]:
        for part in iter_parts(run_dir, conf, class_ids):
            yield part
            counts.detections += len(part.detections)
            progress.update(len(part.images))

    try:
        if fmt == "yolo":
            counts.images = _write_yolo(info, parts(), out)
        else:
            binary = fmt == "csv"  # Arrow's CSV writer takes bytes
            with open_atomic(out, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                counts.images = WRITERS[fmt](info, parts(), f, conf=conf, image_root=image_root)
    finally:
        progress.close()
    return counts


def _rows(part: PartResults) -> Iterator[tuple[dict, dict]]:
    """(image row, its detections as column lists) per image of a part, as plain Python values.

    Converted ROWS_AT_ONCE images at a time: Python objects cost far more memory than Arrow's.
    """
    for start in range(0, len(part.images), ROWS_AT_ONCE):
        stop = min(start + ROWS_AT_ONCE, len(part.images))
        first, last = int(part.offsets[start]), int(part.offsets[stop])
        images = part.images.slice(start, stop - start).to_pydict()
        d = part.detections.slice(first, last - first)
        dets = {k: v.to_pylist() for k, v in zip(d.column_names, d.columns)}
        off = (part.offsets[start:stop + 1] - first).tolist()
        for i in range(stop - start):
            yield ({k: v[i] for k, v in images.items()},
                   {k: v[off[i]:off[i + 1]] for k, v in dets.items()})


def _boxes(d: dict) -> Iterator[tuple[int, str, float, float, float, float, float]]:
    return zip(d["class_id"], d["class_name"], d["score"], d["x1"], d["y1"], d["x2"], d["y2"])


def _json_items(f, items: Iterator) -> int:
    """Write a JSON array, one item per line, as the items come; returns how many."""
    n = 0
    for item in items:
        f.write(("[\n" if n == 0 else ",\n") + json.dumps(item, separators=(",", ":")))
        n += 1
    f.write("[]" if n == 0 else "\n]")
    return n


def _completion_time(info: RunInfo) -> str:
    t = info.run.get("finished") or info.run.get("started") or time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _write_megadetector(info: RunInfo, parts: Iterator[PartResults], f, conf, **_) -> int:
    cfg = info.config
    threshold = max(conf or 0.0, cfg.get("conf") or 0.0)
    head = {
        "info": {
            "format_version": MEGADETECTOR_FORMAT_VERSION,
            "detector": Path(info.run.get("model", {}).get("path", "unknown")).name,
            "detection_completion_time": _completion_time(info),
            "detector_metadata": {
                "image_size": cfg.get("imgsz"), "conf": cfg.get("conf"), "iou": cfg.get("iou"),
                "max_det": cfg.get("max_det"), "export_conf": conf,
                "typical_detection_threshold": threshold, "conservative_detection_threshold": threshold,
            },
            "bulkdet_run_id": info.run.get("run_id"),
        },
        # MegaDetector reserves "0" for "empty": category = class id + 1.
        "detection_categories": {str(k + 1): v for k, v in sorted(info.names.items())},
    }
    f.write(json.dumps(head, indent=1)[:-2] + ',\n "images": ')

    def images():
        for part in parts:
            for img, d in _rows(part):
                if img["status"] not in RESULT_STATUSES:
                    failure = img["status"] + (f": {img['error']}" if img["error"] else "")
                    yield {"file": img["path"], "failure": failure, "detections": None}
                    continue
                w, h = img["width"], img["height"]
                yield {"file": img["path"], "detections": [
                    {"category": str(c + 1), "conf": round(s, 4),
                     "bbox": [round(_clip01(x1 / w), 4), round(_clip01(y1 / h), 4),
                              round(_clip01((x2 - x1) / w), 4), round(_clip01((y2 - y1) / h), 4)]}
                    for c, _, s, x1, y1, x2, y2 in _boxes(d)]}

    n = _json_items(f, images())
    f.write("\n}\n")
    return n


def _clip01(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def _write_coco(info: RunInfo, parts: Iterator[PartResults], f, **_) -> int:
    """Two passes over the parts (images, then annotations) keep memory flat; failed images are left out."""
    head = {"info": {"description": f"bulkdet run {info.run.get('run_id')}",
                     "date_created": _completion_time(info)},
            # COCO ids start at 1 (0 is read as background by some tools): category = class id + 1.
            "categories": [{"id": k + 1, "name": v} for k, v in sorted(info.names.items())]}
    f.write(json.dumps(head, indent=1)[:-2] + ',\n "images": ')
    n = _json_items(f, ({"id": i["image_id"], "file_name": i["path"], "width": i["width"], "height": i["height"]}
                        for b in iter_images(info.run_dir, ["image_id", "path", "width", "height", "status"])
                        for i in b.to_pylist()
                        if i["status"] in RESULT_STATUSES))
    f.write(',\n "annotations": ')

    def annotations():
        ann_id = 0
        for part in parts:
            for img, d in _rows(part):
                for c, _, s, x1, y1, x2, y2 in _boxes(d):
                    ann_id += 1
                    w, h = round(x2 - x1, 2), round(y2 - y1, 2)
                    yield {"id": ann_id, "image_id": img["image_id"], "category_id": c + 1,
                           "bbox": [round(x1, 2), round(y1, 2), w, h],
                           "score": round(s, 5), "area": round(w * h, 2), "iscrowd": 0}

    _json_items(f, annotations())
    f.write("\n}\n")
    return n


def image_url(path: str, image_root: str | None) -> str:
    """The Label Studio `image` field: the root joined to the image's path."""
    if not image_root:
        return path
    return image_root + path if image_root.endswith(("/", "=")) else f"{image_root}/{path}"


def _write_labelstudio(info: RunInfo, parts: Iterator[PartResults], f, image_root, **_) -> int:
    model_version = f"{Path(info.run.get('model', {}).get('path', 'model')).name} run {info.run.get('run_id')}"

    def tasks():
        for part in parts:
            for img, d in _rows(part):
                if img["status"] not in RESULT_STATUSES:
                    continue
                w, h = img["width"], img["height"]
                result = [{"type": "rectanglelabels", "from_name": LS_FROM_NAME, "to_name": LS_TO_NAME,
                           "original_width": w, "original_height": h, "image_rotation": 0,
                           "value": {"x": round(100 * x1 / w, 4), "y": round(100 * y1 / h, 4),
                                     "width": round(100 * (x2 - x1) / w, 4), "height": round(100 * (y2 - y1) / h, 4),
                                     "rotation": 0, "rectanglelabels": [name]},
                           "score": round(s, 5)}
                          for _, name, s, x1, y1, x2, y2 in _boxes(d)]
                score = round(sum(r["score"] for r in result) / len(result), 5) if result else 0.0
                yield {"data": {"image": image_url(img["path"], image_root), "bulkdet_image_id": img["image_id"]},
                       "predictions": [{"model_version": model_version, "score": score, "result": result}]}

    return _json_items(f, tasks())


def _write_csv(info: RunInfo, parts: Iterator[PartResults], f, **_) -> int:
    schema = pa.schema([("path", pa.string()), ("image_id", pa.int64()), ("class_id", pa.int16()),
                        ("class_name", pa.string()), ("score", pa.float32()), ("x1", pa.float32()),
                        ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
                        ("width", pa.int32()), ("height", pa.int32())])
    n = 0
    with pacsv.CSVWriter(f, schema) as writer:
        for part in parts:
            n += sum(1 for s in part.images.column("status").to_pylist() if s in RESULT_STATUSES)
            row = np.repeat(np.arange(len(part.images)), np.diff(part.offsets))
            d = part.detections
            cols = {c: d.column(c) for c in CSV_COLUMNS[:9]}
            cols["width"] = part.images.column("width").take(pa.array(row))
            cols["height"] = part.images.column("height").take(pa.array(row))
            writer.write_table(pa.table(cols).cast(schema))
    return n


def yolo_label_path(out: Path, image_path: str) -> Path:
    """OUT/<the image's path relative to the packed folder, suffix .txt>."""
    rel = PurePosixPath(image_path)
    if rel.is_absolute() or ".." in rel.parts:
        raise RuntimeError(f"image path {image_path!r} would leave {out}")
    return out / rel.with_suffix(".txt")


def _write_yolo(info: RunInfo, parts: Iterator[PartResults], out: Path) -> int:
    """One txt per image that ran (empty when nothing was found); classes.txt lists names by id."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for part in parts:
        for img, d in _rows(part):
            if img["status"] not in RESULT_STATUSES:
                continue
            w, h = img["width"], img["height"]
            lines = "".join(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                            f"{(y2 - y1) / h:.6f} {s:.5f}\n" for c, _, s, x1, y1, x2, y2 in _boxes(d))
            with open_atomic(yolo_label_path(out, img["path"]), "w", fsync=False) as f:
                f.write(lines)
            n += 1
    n_classes = max(info.names, default=-1) + 1
    with open_atomic(out / "classes.txt", "w") as f:
        f.write("".join(f"{info.names.get(i, str(i))}\n" for i in range(n_classes)))
    return n


WRITERS = {"megadetector": _write_megadetector, "coco": _write_coco, "labelstudio": _write_labelstudio,
           "csv": _write_csv}
