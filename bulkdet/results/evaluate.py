"""`bulkdet eval`: a run's detections scored against labels by pycocotools' COCOeval.

Labels are a COCO ground-truth JSON (images matched to the run by `file_name` = the path
relative to the packed folder, categories by name) or a YOLO labels folder (RUN's image path
with .txt, lines `class xc yc w h` normalised; class ids are the model's, or named by the
folder's classes.txt). Only images both in the run and in the labels are scored. The numbers
are COCOeval's own (standard parameters: IoU .50:.95, up to 100 detections per image); the
result, with a precision-recall curve per class at IoU .50, is saved as RUN/eval.json for
`bulkdet report`.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path, PurePosixPath

import numpy as np

from bulkdet.results.run_info import RunInfo, UsageError
from bulkdet.store.parts import EVAL, RESULT_STATUSES, iter_images, iter_parts
from bulkdet.store.atomic import write_json_atomic

MISSING = "eval needs pycocotools: pip install 'bulkdet[eval]'"


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise RuntimeError(MISSING) from exc
    return COCO, COCOeval


def _norm(path: str) -> str:
    return str(PurePosixPath(path.replace("\\", "/"))).removeprefix("./")


def _coco_labels(path: Path, info: RunInfo) -> tuple[dict, dict[str, int], dict[int, int]]:
    """(ground truth, run path -> gt image id, run class id -> gt category id)."""
    try:
        gt = json.loads(path.read_text())
        images, categories = gt["images"], gt["categories"]
        for ann in gt.setdefault("annotations", []):  # optional in many files; COCOeval reads them
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a COCO ground-truth JSON (images, categories, annotations): {exc}")
    by_path = {_norm(im["file_name"]): im["id"] for im in images}
    by_name = {c["name"]: c["id"] for c in categories}
    class_map = {k: by_name[v] for k, v in info.names.items() if v in by_name}
    if not class_map:
        raise UsageError(f"no category of {path} ({', '.join(sorted(by_name))}) is a class of the run "
                         f"({', '.join(info.names.values())}); categories are matched by name")
    return gt, by_path, class_map


def _yolo_labels(folder: Path, info: RunInfo) -> tuple[dict, dict[str, int], dict[int, int]]:
    """A COCO ground truth made from YOLO txt labels; ids: image id = the run's, category = class id + 1."""
    names = dict(info.names)
    label_names = folder / "classes.txt"
    remap = None  # label class index -> run class id, when classes.txt names them
    if label_names.exists():
        listed = [n.strip() for n in label_names.read_text().splitlines() if n.strip()]
        by_name = {v: k for k, v in names.items()}
        remap = {i: by_name[n] for i, n in enumerate(listed) if n in by_name}
    images, annotations, by_path = [], [], {}
    batches = iter_images(info.run_dir, ["image_id", "path", "width", "height", "status"])
    for img in (row for batch in batches for row in batch.to_pylist()):
        txt = folder / PurePosixPath(img["path"]).with_suffix(".txt")
        if img["status"] not in RESULT_STATUSES or not txt.is_file():
            continue  # an image without a label file is not labelled: not scored
        w, h = img["width"], img["height"]
        images.append({"id": img["image_id"], "file_name": img["path"], "width": w, "height": h})
        by_path[img["path"]] = img["image_id"]
        for n, line in enumerate(txt.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                c, xc, yc, bw, bh = int(fields[0]), *map(float, fields[1:5])
            except (ValueError, TypeError):
                raise UsageError(f"{txt}:{n}: not a YOLO label line (class xc yc w h): {line!r}")
            if remap is not None:
                if c not in remap:
                    continue  # a class the run does not have
                c = remap[c]
            bw, bh = bw * w, bh * h
            annotations.append({"id": len(annotations) + 1, "image_id": img["image_id"], "category_id": c + 1,
                                "bbox": [xc * w - bw / 2, yc * h - bh / 2, bw, bh], "area": bw * bh, "iscrowd": 0})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": k + 1, "name": v} for k, v in sorted(names.items())]}
    return gt, by_path, {k: k + 1 for k in names}


def evaluate(run_dir: Path, labels: Path, save: bool = True) -> dict:
    COCO, COCOeval = _pycocotools()
    info = RunInfo.load(run_dir)
    labels = Path(labels)
    if labels.is_dir():
        gt, by_path, class_map = _yolo_labels(labels, info)
        kind = "yolo"
    else:
        gt, by_path, class_map = _coco_labels(labels, info)
        kind = "coco"
    rows, matched = [], []
    for part in iter_parts(run_dir, class_ids=sorted(class_map)):
        paths = part.images.column("path").to_pylist()
        gt_ids = [by_path.get(_norm(p)) for p in paths]
        matched += [g for g in gt_ids if g is not None]
        row = np.repeat(np.arange(len(paths)), np.diff(part.offsets))
        img_gt = np.array([-1 if g is None else g for g in gt_ids], np.int64)[row]
        d = part.detections
        x1, y1 = d.column("x1").to_numpy(), d.column("y1").to_numpy()
        cat = np.array([class_map[c] for c in d.column("class_id").to_pylist()], np.int64)
        keep = img_gt >= 0
        rows.append(np.stack([img_gt, x1, y1, d.column("x2").to_numpy() - x1, d.column("y2").to_numpy() - y1,
                              d.column("score").to_numpy(), cat], 1).astype(np.float64)[keep])
    if not matched:
        example = next(iter(by_path), None)
        raise UsageError(f"no image of the run is in {labels} (e.g. labels name {example!r}); images are "
                         "matched by their path relative to the folder given to `bulkdet pack`")
    dets = np.concatenate(rows) if rows else np.zeros((0, 7))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        cat_ids = sorted(set(class_map.values()))
        names = {c["id"]: c["name"] for c in gt["categories"]}
        if len(dets):
            coco_dt = coco_gt.loadRes(dets)
            E = COCOeval(coco_gt, coco_dt, "bbox")
            E.params.imgIds = sorted(set(matched))
            E.params.catIds = cat_ids
            E.evaluate()
            E.accumulate()
            E.summarize()
    result = {"labels": str(labels), "labels_format": kind, "images": len(set(matched)),
              "detections": int(len(dets)), "run_id": info.run.get("run_id"), "time": time.time()}
    if not len(dets):  # nothing detected on the labelled images: every AP and recall is 0
        zero = {"ap50_95": 0.0, "ap50": 0.0, "recall50_95": 0.0, "recall50": 0.0}
        per_class = {names[c]: {**zero, "gt": len(coco_gt.getAnnIds(catIds=[c])), "pr50": None} for c in cat_ids}
        return _finish(run_dir, {**result, "map50_95": 0.0, "map50": 0.0, "per_class": per_class,
                                 "recall_thresholds": []}, save)
    precision, recall = E.eval["precision"], E.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    per_class = {}
    for k, c in enumerate(E.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", the most detections per image
        r = recall[:, k, 0, -1]
        n_gt = len(coco_gt.getAnnIds(imgIds=E.params.imgIds, catIds=[c], iscrowd=False))
        per_class[names[c]] = {
            "ap50_95": _mean(p), "ap50": _mean(p[0]), "recall50_95": _mean(r), "recall50": _mean(r[:1]),
            "gt": n_gt, "pr50": [round(float(v), 4) for v in p[0]] if n_gt else None}
    result.update(map50_95=float(E.stats[0]), map50=float(E.stats[1]), per_class=per_class,
                  recall_thresholds=[round(float(v), 2) for v in E.params.recThrs])
    return _finish(run_dir, result, save)


def _mean(a: np.ndarray) -> float | None:
    """COCOeval's mean: -1 marks 'no ground truth'; None when there is nothing to average."""
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else None


def _finish(run_dir: Path, result: dict, save: bool) -> dict:
    if save:
        write_json_atomic(result, Path(run_dir) / EVAL)
    return result
