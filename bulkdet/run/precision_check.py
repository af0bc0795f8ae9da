"""`run --check-precision N`: the same N images through the FP32 model too; which detections drift.

FP16 and INT8 are shown safe on the user's own images, not assumed. Both models run the batches
the run makes of those images (with --tile, their tiles, merged per image as the run merges
them). Per image and class, the reduced-precision boxes are matched to the FP32 boxes (greedy,
highest IoU first, IoU >= 0.5); a matched box drifts when its IoU with the FP32 box is below 0.9
or its score differs by more than 0.05; an FP32 box with no match is missed, a box with no FP32
match is extra.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from bulkdet.engines.base import fixed_batch
from bulkdet.run.plan import Batch
from bulkdet.run.postprocess import Detections, postprocess
from bulkdet.run.tiles import ImageAssembler, TileSettings

MATCH_IOU = 0.5  # below this two boxes are different objects, not one drifting box
IOU_MIN = 0.9
SCORE_TOL = 0.05
MAX_EXAMPLES = 20


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [n,4] with every box in b [m,4] (x1, y1, x2, y2)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match(ref: Detections, test: Detections, min_iou: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """(ref index, test index, IoU) pairs of the same class, greedily by highest IoU."""
    pairs = []
    for cls in np.intersect1d(ref.class_ids, test.class_ids):
        ri = np.flatnonzero(ref.class_ids == cls)
        ti = np.flatnonzero(test.class_ids == cls)
        iou = pairwise_iou(ref.boxes[ri], test.boxes[ti])
        while iou.size and iou.max() >= min_iou:
            r, t = np.unravel_index(int(iou.argmax()), iou.shape)
            pairs.append((int(ri[r]), int(ti[t]), float(iou[r, t])))
            iou[r, :] = -1
            iou[:, t] = -1
    return pairs


@dataclass
class DriftReport:
    precision: str
    images: int = 0
    reference_boxes: int = 0
    boxes: int = 0
    matched: int = 0
    iou_drift: int = 0  # matched, IoU < IOU_MIN
    score_drift: int = 0  # matched, |score difference| > SCORE_TOL
    missed: int = 0  # FP32 box with no match
    extra: int = 0  # box with no FP32 match
    ious: list = field(default_factory=list, repr=False)
    score_diffs: list = field(default_factory=list, repr=False)
    examples: list = field(default_factory=list)

    def add_image(self, path: str, ref: Detections, test: Detections) -> None:
        self.images += 1
        self.reference_boxes += len(ref)
        self.boxes += len(test)
        pairs = match(ref, test)
        self.matched += len(pairs)
        matched_ref, matched_test = {r for r, _, _ in pairs}, {t for _, t, _ in pairs}
        for r, t, iou in pairs:
            diff = float(abs(ref.scores[r] - test.scores[t]))
            self.ious.append(iou)
            self.score_diffs.append(diff)
            kinds = (["iou"] if iou < IOU_MIN else []) + (["score"] if diff > SCORE_TOL else [])
            self.iou_drift += "iou" in kinds
            self.score_drift += "score" in kinds
            if kinds:
                self._example(path, "+".join(kinds), ref, r, test, t, iou)
        for r in sorted(set(range(len(ref))) - matched_ref):
            self.missed += 1
            self._example(path, "missed", ref, r, None, None, None)
        for t in sorted(set(range(len(test))) - matched_test):
            self.extra += 1
            self._example(path, "extra", None, None, test, t, None)

    def _example(self, path, kind, ref, r, test, t, iou) -> None:
        if len(self.examples) >= MAX_EXAMPLES:
            return
        one = {"path": path, "kind": kind}
        for name, det, i in (("fp32", ref, r), (self.precision, test, t)):
            if det is not None:
                one[name] = {"class_id": int(det.class_ids[i]), "score": round(float(det.scores[i]), 4),
                             "box": [round(float(v), 1) for v in det.boxes[i]]}
        if iou is not None:
            one["iou"] = round(iou, 4)
        self.examples.append(one)

    @property
    def drifting(self) -> int:
        """Boxes that drift in any way (a matched box drifting in IoU and score counts once)."""
        both = sum(1 for iou, d in zip(self.ious, self.score_diffs) if iou < IOU_MIN and d > SCORE_TOL)
        return self.iou_drift + self.score_drift - both + self.missed + self.extra

    def as_dict(self) -> dict:
        return {
            "precision": self.precision, "reference": "fp32", "images": self.images,
            "reference_boxes": self.reference_boxes, "boxes": self.boxes, "matched": self.matched,
            "drifting": self.drifting, "iou_below": self.iou_drift, "score_diff_above": self.score_drift,
            "missed": self.missed, "extra": self.extra,
            "drift_rate": round(self.drifting / max(self.reference_boxes, 1), 4),
            "mean_iou": round(float(np.mean(self.ious)), 4) if self.ious else None,
            "min_iou": round(float(np.min(self.ious)), 4) if self.ious else None,
            "max_score_diff": round(float(np.max(self.score_diffs)), 4) if self.score_diffs else None,
            "thresholds": {"iou_min": IOU_MIN, "score_tol": SCORE_TOL, "match_iou": MATCH_IOU},
            "examples": self.examples,
        }

    def summary(self) -> str:
        d = self.as_dict()
        quality = (f" (mean IoU {d['mean_iou']:.3f}, min {d['min_iou']:.3f}, max score diff "
                   f"{d['max_score_diff']:.3f})" if self.ious else "")
        return (f"precision check, {self.precision} vs fp32 on {self.images} images: "
                f"{self.reference_boxes} fp32 boxes, {self.matched} matched{quality}; "
                f"{self.drifting} drifting: {self.iou_drift} IoU < {IOU_MIN}, {self.score_drift} score diff > "
                f"{SCORE_TOL}, {self.missed} missed, {self.extra} extra")


def first_images(rows: pa.Table, n: int) -> pa.Table:
    """The first n manifest rows in run order (shard, then image id)."""
    return rows.sort_by([("shard", "ascending"), ("image_id", "ascending")]).slice(0, n)


class Detector:
    """decode -> infer -> postprocess for whole batches, one model (a reference or the one tested)."""

    def __init__(self, engine, decoder, layout, conf: float, iou: float, max_det: int,
                 output_names: list[str] | None = None, batch: int | None = None):
        """`layout(outputs) -> str`: the model's output layout (told by a batch's outputs if need be);
        `batch`: the model's fixed batch (shorter batches are padded to it), None: dynamic."""
        self.engine, self.decoder, self.layout = engine, decoder, layout
        self.infer = fixed_batch(engine.infer, batch)
        self.max_det = max_det
        self.post = dict(conf=conf, iou=iou, max_det=max_det, output_names=output_names)

    def __call__(self, batch: Batch, encoded: list[bytes]) -> tuple[list[Detections], dict[int, str]]:
        decoded = self.decoder.decode(batch, encoded)
        staged = self.engine.stage(decoded.tensor)  # as the run does: GPU engines' input buffer
        try:
            outputs = self.infer(staged)
        finally:
            self.engine.release(staged)
        detections = postprocess(outputs, batch, self.layout(outputs), **self.post)
        return detections, {**{i: d.error for i, d in enumerate(detections) if d.error}, **decoded.errors}


def check_precision(batches, read, reference: Detector, tested: Detector, precision: str,
                    tiles: TileSettings | None = None) -> DriftReport:
    """Both models on the same batches, compared image by image; images that failed with either
    are left out. `tiles`: the batches hold tile items, merged per image as the run merges them."""
    report = DriftReport(precision)
    assemblers = [ImageAssembler(tiles, d.max_det) if tiles and tiles.on else None for d in (reference, tested)]
    for batch in batches:
        encoded = [data or b"" for data in read(batch)]
        ref, test = (_images(batch, *detect(batch, encoded), assembler)
                     for detect, assembler in zip((reference, tested), assemblers))
        for (path, r), (_, t) in zip(ref, test):
            if r is not None and t is not None:
                report.add_image(path, r, t)
    return report


def _images(batch: Batch, detections: list[Detections], errors: dict[int, str],
            assembler: ImageAssembler | None) -> list[tuple[str, Detections | None]]:
    """(path, detections or None where it failed) of each image the batch completes: its own
    images, or, of tile items, the images whose last item it holds (their items merged)."""
    if assembler is None:
        return [(path, None if i in errors else detections[i]) for i, path in enumerate(batch.paths)]
    n = range(len(batch))
    done = assembler.add(batch, ["decode_error" if i in errors else "ok" for i in n], [errors.get(i) for i in n],
                         [None if i in errors else detections[i] for i in n])
    return list(zip(done[1], done[6])) if done else []


def check_run_precision(cfg, prepared, todo, processor) -> DriftReport | None:
    """`run --check-precision N`: the first N images left to do through the FP32 source model too,
    on the same device and backend (a runner.ShardProcessor holds the run's engine, decoder and
    reader); None when there is no FP32 model to compare with."""
    import logging

    from bulkdet.run.decode import Decoder
    from bulkdet.engines import create_engine
    from bulkdet.model.info import load_model_info
    from bulkdet.model.layouts import detect_batch
    from bulkdet.store.readers import Unreadable

    log = logging.getLogger("bulkdet")
    if prepared.precision == "engine" or Path(prepared.path) == Path(cfg.model):
        log.warning("--check-precision: nothing to compare (the model given runs as it is; pass the FP32 "
                    "ONNX with --precision fp16 or int8, or --nms-in-model)")
        return None
    engine, decoder = processor.engine, processor.decoder
    reference_engine = create_engine(engine.name, cfg.model, device=processor.device, threads=cfg.infer_threads,
                                     shapes=processor.shapes, cache_dir=cfg.cache_dir, ring_slots=2)
    try:
        reference_decoder = decoder
        if np.dtype(reference_engine.input_dtype) != np.dtype(engine.input_dtype):
            reference_decoder = Decoder(decoder.device, decoder.max_batch, cfg.dali_threads,
                                        out_dtype=reference_engine.input_dtype, hw_decoder_load=cfg.hw_decoder_load,
                                        decode_budget=decoder.decode_budget, norm=decoder.norm)
        post = (cfg.conf, cfg.iou, cfg.max_det)
        reference = load_model_info(cfg.model, cfg.names)  # the FP32 source: no NMS in it (usually)
        told = (len(reference.names) or None, reference.end2end, cfg.layout or reference.layout_hint)
        reference_layout = functools.partial(detect_batch, reference.outputs, nc=told[0], end2end=told[1],
                                             override=told[2])
        batches = processor.plan(first_images(todo, cfg.precision_check_images))  # as the run batches them

        def read(batch: Batch) -> list[bytes | None]:
            got = processor.read(batch)
            return [None if isinstance(got[key], Unreadable) else got[key] for key in batch.keys]

        report = check_precision(batches, read,
                                 Detector(reference_engine, reference_decoder, reference_layout, *post,
                                          [name for name, _ in reference.outputs], reference.batch),
                                 Detector(engine, decoder, processor.layout_for, *post, processor.output_names,
                                          processor.model.batch),
                                 prepared.precision + ("+nms" if prepared.nms else ""), cfg.tiles)
    finally:
        reference_engine.close()
    log.info(report.summary())
    return report
