"""`bulkdet report`: what a run found and where its time and pixels went.

Everything shown is computed once by `summarize()` (also the `--json` output and the HTML
report's figures). Large runs are read in a streaming way: the detections parts one record
batch at a time (class counts and a score histogram), the images parts by their status column.

Warm-up: a run spends its first seconds loading the model, building the DALI pipeline and
filling the queues. Throughput is therefore measured from the moment the first batch was
written (the pipeline is full and every stage has run once) to the last: images of the batches
written in that window divided by its length. The whole span, warm-up included, is reported too.
Right after the first batch, the batches already in flight can come out in a burst; a window
of fewer than MIN_STEADY_BATCHES batches (more than the pipeline holds in flight: 5 stages,
each with a queue of 2 and one batch in work) would be dominated by that burst, so a run that
short is measured over its whole span instead, and the report says so.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bulkdet.run.metrics import stages_of
from bulkdet.store.parts import iter_detections, iter_images, read_eval, read_metrics, read_run_json

FIRST_FAILURES = 3  # paths shown per failure status
SCORE_BINS = 50  # score histogram bins over 0..1
MIN_STEADY_BATCHES = 16  # batches after the first one out, to measure a steady rate (see above)
# What to try when a stage is the busiest one: one hint per name of metrics.STAGES.
HINTS = {
    "read": "reading shards: faster storage, or fewer, larger reads (bigger batches)",
    "decode": "decoding: more --dali-threads, or --device gpu (nvJPEG / hardware JPEG decoder)",
    "infer": "the model: --precision fp16 / int8, a GPU, or less padding (aspect buckets, --pixel-budget)",
    "postprocess": "post-processing: a higher --conf or lower --max-det keeps fewer candidates",
    "write": "writing Parquet: a faster disk for --out",
}


def summarize(run_dir: Path) -> dict:
    """Everything the report shows, as plain data (also the --json output)."""
    run_dir = Path(run_dir)
    run = read_run_json(run_dir)
    config = run.get("config", {})
    out = {
        "run_dir": str(run_dir), "run_id": run.get("run_id"), "state": run.get("state"),
        "device": run.get("device"), "backend": run.get("backend"), "provider": run.get("provider"),
        "model": run.get("model", {}).get("path"), "precision": config.get("precision"),
        "imgsz": config.get("imgsz"), "max_batch": config.get("max_batch"),
        "wall_s": run.get("totals", {}).get("wall_s"),
    }
    out.update(image_counts(run_dir))
    out.update(detection_counts(run_dir))
    metrics = read_metrics(run_dir)
    if metrics is not None and len(metrics):
        out.update(timing_summary(metrics))
    evaluation = read_eval(run_dir)
    if evaluation is not None:
        out["eval"] = evaluation
    return out


def image_counts(run_dir: Path) -> dict:
    """Images by status, and the first few paths of each failure status."""
    by_status: Counter = Counter()
    for batch in iter_images(run_dir, ["status"]):
        for c in batch.column("status").value_counts().to_pylist():
            by_status[c["values"]] += c["counts"]
    by_status = dict(by_status.most_common())
    first: dict[str, list[dict]] = {s: [] for s in by_status if s != "ok"}
    if first:
        for batch in iter_images(run_dir, ["path", "status", "error"], filter=pc.field("status") != "ok"):
            for row in batch.to_pylist():
                if len(first[row["status"]]) < FIRST_FAILURES:
                    first[row["status"]].append({"path": row["path"], "error": row["error"]})
            if all(len(v) >= min(FIRST_FAILURES, by_status[s]) for s, v in first.items()):
                break
    total = sum(by_status.values())
    return {"images": total, "ok": by_status.get("ok", 0), "failed": total - by_status.get("ok", 0),
            "by_status": by_status, "first_failures": first}


def detection_counts(run_dir: Path) -> dict:
    """Detections per class and a histogram of scores, one record batch at a time."""
    per_class: Counter = Counter()
    hist = np.zeros(SCORE_BINS, np.int64)
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    for batch in iter_detections(run_dir, ["class_name", "score"]):
        names = batch.column("class_name")
        if isinstance(names.type, pa.DictionaryType):
            names = names.dictionary_decode()
        for c in names.value_counts().to_pylist():
            per_class[str(c["values"])] += c["counts"]
        scores = np.clip(batch.column("score").to_numpy(zero_copy_only=False), 0.0, 1.0)
        hist += np.histogram(scores, bins=edges)[0]
    return {"detections": int(sum(per_class.values())), "per_class": dict(per_class.most_common()),
            "score_hist": {"edges": edges.round(4).tolist(), "counts": hist.tolist()}}


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def timeline(metrics: pa.Table) -> dict[str, np.ndarray]:
    """Per-batch arrays, with the invocations of a resumed run laid end to end in time.

    Keys: `batch_size`, `original_pixels`, `encoded_bytes`, `start`, `end` (seconds on one
    clock), `<stage>_start`/`<stage>_end` on that clock, and `<stage>_s` busy seconds.
    """
    stages = stages_of(metrics)
    first, last = stages[0], stages[-1]
    run_ids = _col(metrics, "run_id").astype(str)
    offset = np.zeros(len(metrics))
    clock = 0.0
    for rid in dict.fromkeys(run_ids.tolist()):  # in order of appearance
        sel = run_ids == rid
        offset[sel] = clock - np.nanmin(_col(metrics, f"{first}_start")[sel])
        clock += np.nanmax(_col(metrics, f"{last}_end")[sel]) - np.nanmin(_col(metrics, f"{first}_start")[sel])
    t = {name: _col(metrics, name) for name in ("batch_size", "original_pixels", "encoded_bytes",
                                                "input_pixels", "padding_pixels", "input_h", "input_w")}
    # Images and tiles per batch (metrics of runs before --tile: images = batch items, no tiles).
    names = metrics.column_names
    t["images"] = (pc.coalesce(metrics.column("images_written"), metrics.column("batch_size")).to_numpy()
                   if "images_written" in names else t["batch_size"])
    t["tiles"] = pc.fill_null(metrics.column("tiles"), 0).to_numpy() if "tiles" in names else np.zeros(len(metrics), int)
    t["run_id"] = run_ids
    for stage in stages:
        t[f"{stage}_start"] = _col(metrics, f"{stage}_start") + offset
        t[f"{stage}_end"] = _col(metrics, f"{stage}_end") + offset
        t[f"{stage}_s"] = _col(metrics, f"{stage}_s")
        t[f"{stage}_queue"] = _col(metrics, f"{stage}_queue")
    t["start"], t["end"] = t[f"{first}_start"], t[f"{last}_end"]
    t["stages"] = stages
    return t


def steady_window(t: dict) -> tuple[np.ndarray, float, float]:
    """(mask of batches after warm-up, steady seconds, warm-up seconds), see the module doc."""
    steady = np.zeros(len(t["end"]), bool)
    steady_s = warmup_s = 0.0
    for rid in dict.fromkeys(t["run_id"].tolist()):
        sel = t["run_id"] == rid
        first_out = np.nanmin(t["end"][sel])
        window = np.nanmax(t["end"][sel]) - first_out
        if window > 0:
            steady |= sel & (t["end"] > first_out)
            steady_s += window
            warmup_s += first_out - np.nanmin(t["start"][sel])
    return steady, steady_s, warmup_s


def timing_summary(metrics: pa.Table) -> dict:
    """Throughput, latency, busy share per stage, padding, batch sizes: from metrics.parquet."""
    t = timeline(metrics)
    stages = t["stages"]
    n = len(t["end"])
    processed = int(t["images"].sum())
    span = float(np.nanmax(t["end"]) - np.nanmin(t["start"]))
    steady, steady_s, warmup_s = steady_window(t)
    warmup_excluded = steady.sum() >= MIN_STEADY_BATCHES and steady_s > 0
    if not warmup_excluded:  # too short to tell warm-up from steady state: the whole span
        steady, steady_s, warmup_s = np.ones(n, bool), span, 0.0
    steady_s = max(steady_s, 1e-9)
    latency = t["end"] - t["start"]
    stage_s = {s: float(np.nansum(t[f"{s}_s"])) for s in stages}
    share = {s: v / max(span, 1e-9) for s, v in stage_s.items()}
    bottleneck = max(share, key=share.get)
    sizes = Counter(t["batch_size"].tolist())
    buckets = Counter(f"{h}x{w}" for h, w in zip(t["input_h"].tolist(), t["input_w"].tolist()))
    input_px = int(t["input_pixels"].sum())
    return {
        "batches": n, "processed": processed, "invocations": len(set(t["run_id"].tolist())),
        "elapsed_s": span, "warmup_excluded": bool(warmup_excluded), "warmup_s": warmup_s, "warmup_batches": int(n - steady.sum()), "steady_s": steady_s,
        "images_per_s": float(t["images"][steady].sum() / steady_s),
        "tiles": int(t["tiles"].sum()), "tiles_per_s": float(t["tiles"][steady].sum() / steady_s),
        "items_per_s": float(t["batch_size"][steady].sum() / steady_s),
        "megapixels_per_s": float(t["original_pixels"][steady].sum() / steady_s / 1e6),
        "input_megapixels_per_s": float(t["input_pixels"][steady].sum() / steady_s / 1e6),
        "mb_per_s": float(t["encoded_bytes"][steady].sum() / steady_s / 1e6),
        "overall_images_per_s": processed / max(span, 1e-9),
        "latency_s": {f"p{q}": float(np.nanpercentile(latency, q)) for q in (50, 90, 99)},
        "stage_s": stage_s, "stage_busy_share": share, "bottleneck": bottleneck,
        "queue_mean": {s: float(np.nanmean(t[f"{s}_queue"].astype(float))) for s in stages},
        "input_megapixels": input_px / 1e6, "original_megapixels": float(t["original_pixels"].sum() / 1e6),
        "padding_share": float(t["padding_pixels"].sum() / input_px) if input_px else 0.0,
        "batch_size_hist": {int(k): v for k, v in sorted(sizes.items())},
        "buckets": dict(buckets.most_common()),
    }


# ----------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------

def _bar(fraction: float, width: int = 16) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    return "█" * round(fraction * width)


def print_report(run_dir: Path, console: Console | None = None) -> dict:
    console = console or Console()
    s = summarize(run_dir)
    console.print(f"[bold]bulkdet run[/bold] {s['run_id']}  ({s['state']})  device={s['device']} "
                  f"backend={s['backend']} provider={s['provider']} precision={s['precision']}")
    console.print(f"model: {s['model']}", markup=False)
    console.print(f"images: {s['images']}  ok: {s['ok']}  failed: {s['failed']}  detections: {s['detections']}")
    if "images_per_s" in s:
        _print_timing(console, s)
    if s["failed"]:
        _print_failures(console, s)
    if s["per_class"]:
        t = Table(title="detections per class (top 15)", title_justify="left")
        t.add_column("class")
        t.add_column("detections", justify="right")
        t.add_column("share", justify="right")
        for name, n in list(s["per_class"].items())[:15]:
            t.add_row(escape(name), str(n), f"{n / s['detections']:.1%}")
        console.print(t)
    if "eval" in s:
        print_eval(s["eval"], console)
    return s


def print_eval(e: dict, console: Console | None = None) -> None:
    """The result of `bulkdet eval`: mAPs, then AP and recall per class."""
    console = console or Console()
    t = Table(title=f"accuracy against {escape(e['labels'])} ({e['images']} labelled images; COCO mAP by "
              f"pycocotools): mAP@[.5:.95] {e['map50_95']:.3f}, mAP@.5 {e['map50']:.3f}", title_justify="left")
    for col in ("class", "labelled boxes", "AP@[.5:.95]", "AP@.5", "recall@[.5:.95]", "recall@.5"):
        t.add_column(col, justify="left" if col == "class" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, c in e["per_class"].items():
        t.add_row(escape(name), str(c["gt"]), fmt(c["ap50_95"]), fmt(c["ap50"]), fmt(c["recall50_95"]),
                  fmt(c["recall50"]))
    console.print(t)


def _print_timing(console: Console, s: dict) -> None:
    caption = ("warm-up excluded: measured from the first batch written to the last" if s["warmup_excluded"] else
               f"measured over the whole run: {s['batches']} batches are too few to tell warm-up from steady state")
    t = Table(title="throughput", title_justify="left", show_header=False, caption=caption, caption_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("images/s", f"{s['images_per_s']:.1f}")
    if s.get("tiles"):  # --tile: the model's items are tiles (and full passes)
        t.add_row("tiles/s", f"{s['tiles_per_s']:.1f}")
        t.add_row("model inputs/s (tiles + full passes)", f"{s['items_per_s']:.1f}")
    t.add_row("megapixels/s (originals)", f"{s['megapixels_per_s']:.1f}")
    t.add_row("megapixels/s (model input)", f"{s['input_megapixels_per_s']:.1f}")
    t.add_row("MB/s read", f"{s['mb_per_s']:.1f}")
    if s["warmup_excluded"]:
        t.add_row("warm-up", f"{s['warmup_s']:.2f} s, {s['warmup_batches']} batch(es)")
        t.add_row("whole span, warm-up included",
                  f"{s['overall_images_per_s']:.1f} images/s over {s['elapsed_s']:.2f} s")
    lat = s["latency_s"]
    t.add_row("batch latency p50 / p90 / p99", f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} s")
    t.add_row("padding waste", f"{s['padding_share']:.1%} of {s['input_megapixels']:.1f} input megapixels")
    t.add_row("processed now", f"{s['processed']} images in {s['batches']} batches"
              + (f", {s['invocations']} invocations" if s["invocations"] > 1 else ""))
    console.print(t)

    t = Table(title="where the time went", title_justify="left", caption_justify="left",
              caption="stages run at the same time: shares add up to more than 100%; "
                      "queued = batches waiting in front of the stage, on average")
    for col in ("stage", "busy s", "busy share", "", "queued"):
        t.add_column(col, justify="left" if col in ("stage", "") else "right")
    for stage, secs in s["stage_s"].items():
        share = s["stage_busy_share"][stage]
        name = f"[bold]{stage} ◀[/bold]" if stage == s["bottleneck"] else stage
        t.add_row(name, f"{secs:.2f}", f"{share:.0%}", _bar(share), f"{s['queue_mean'][stage]:.1f}")
    console.print(t)
    console.print(f"busiest stage: {s['bottleneck']} -> {HINTS.get(s['bottleneck'], '')}", markup=False)

    t = Table(title="batch sizes", title_justify="left")
    for col in ("images per batch", "batches", ""):
        t.add_column(col, justify="right" if col != "" else "left")
    most = max(s["batch_size_hist"].values())
    for size, n in s["batch_size_hist"].items():
        t.add_row(str(size), str(n), _bar(n / most))
    console.print(t)
    if len(s["buckets"]) > 1:
        console.print("input shapes (batches): " + ", ".join(f"{k}: {v}" for k, v in s["buckets"].items()))


def _print_failures(console: Console, s: dict) -> None:
    t = Table(title="failures by status", title_justify="left")
    for col in ("status", "images", "first paths"):
        t.add_column(col, justify="right" if col == "images" else "left")
    for status, n in s["by_status"].items():
        if status != "ok":
            first = "\n".join(f"{f['path']}: {f['error']}" for f in s["first_failures"].get(status, []))
            t.add_row(escape(status), str(n), escape(first))
    console.print(t)


# ----------------------------------------------------------------------------------------
# Two runs side by side
# ----------------------------------------------------------------------------------------

COMPARED = [  # (label, key in summarize(), higher is better: True/False/None for not a figure)
    ("device", "device", None), ("backend", "backend", None), ("provider", "provider", None),
    ("precision", "precision", None), ("input size", "imgsz", None), ("max batch", "max_batch", None),
    ("images", "images", None), ("failed", "failed", False),
    ("detections", "detections", None), ("images/s", "images_per_s", True),
    ("megapixels/s", "megapixels_per_s", True), ("MB/s read", "mb_per_s", True),
    ("latency p50 s", "latency_s.p50", False), ("latency p99 s", "latency_s.p99", False),
    ("warm-up s", "warmup_s", False), ("padding waste", "padding_share", False),
    ("bottleneck", "bottleneck", None),
]


def _get(s: dict, key: str):
    for k in key.split("."):
        s = s.get(k) if isinstance(s, dict) else None
    return s


def compare(a: dict, b: dict) -> dict:
    """Two summaries side by side: each figure for A and B, and B ÷ A where both are numbers."""
    rows = []
    stages = list(dict.fromkeys([*a.get("stage_s", {}), *b.get("stage_s", {})]))
    keys = COMPARED + [(f"{s} busy share", f"stage_busy_share.{s}", False) for s in stages]
    for label, key, _ in keys:
        va, vb = _get(a, key), _get(b, key)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        rows.append({"figure": label, "a": va, "b": vb, "b_over_a": vb / va if numeric and va else None})
    classes = list(dict.fromkeys([*a["per_class"], *b["per_class"]]))
    per_class = {c: {"a": a["per_class"].get(c, 0), "b": b["per_class"].get(c, 0)} for c in classes}
    return {"a": a, "b": b, "rows": rows, "per_class": per_class}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_compare(run_a: Path, run_b: Path, console: Console | None = None) -> dict:
    console = console or Console()
    c = compare(summarize(run_a), summarize(run_b))
    console.print(f"A: {run_a}  (run {c['a']['run_id']})\nB: {run_b}  (run {c['b']['run_id']})", markup=False)
    t = Table(title="A vs B", title_justify="left")
    for col in ("figure", "A", "B", "B ÷ A"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for r in c["rows"]:
        t.add_row(r["figure"], escape(_fmt(r["a"])), escape(_fmt(r["b"])),
                  f"{r['b_over_a']:.2f}×" if r["b_over_a"] else "")
    console.print(t)
    if c["per_class"]:
        t = Table(title="detections per class (top 15 of A and B)", title_justify="left")
        for col in ("class", "A", "B", "B - A"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for name, v in list(c["per_class"].items())[:15]:
            t.add_row(escape(name), str(v["a"]), str(v["b"]), f"{v['b'] - v['a']:+d}")
        console.print(t)
    return c
