"""`bulkdet report RUN_DIR --html FILE`: one self-contained HTML page with plots and samples.

Plots are drawn with matplotlib's object API (no pyplot, no GUI backend) and inlined as SVG
with text kept as text, so the page needs no network, no JavaScript and no other file; it
stays small and sharp at any zoom. Sample images are read back from the dataset's shards
(the original bytes), turned upright, drawn on with Pillow and inlined as base64 JPEG.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont, ImageOps

from bulkdet.results.report import summarize, timeline
from bulkdet.store.atomic import write_text_atomic
from bulkdet.store.parts import RESULT_STATUSES, iter_detections, iter_images, read_metrics, read_run_json

N_SAMPLES = 6
LABELLED_BOXES = 15  # boxes with a text label per sample (the highest scores); the rest are outlines only
SAMPLE_SIDE = 480  # longest side of a sample thumbnail, pixels
TIMELINE_BATCHES = 40  # batches shown in the stage timeline
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # matplotlib's tab10, also used for boxes

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { font-size: 1.15em; margin-top: 28px; }
.meta { color: #555; font-size: 0.9em; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 1.3em; } .card span { color: #666; font-size: 0.8em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #eee; border-radius: 6px; padding: 8px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #555; margin-top: 4px; word-break: break-all; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.samples img { max-width: 100%; display: block; margin: auto; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f5f5f5; text-align: left; } td.num { text-align: right; }
"""


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------

def _figure(w: float = 6.4, h: float = 3.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _svg(fig) -> str:
    """The figure as an inline <svg> element (no XML prolog, text kept as text)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bulkdet"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def plot_throughput(t: dict, s: dict) -> str:
    end = t["end"]
    nbins = int(np.clip(len(end) // 4, 1, 120))  # at least ~4 batches a bin, so the rate is not just noise
    edges = np.linspace(float(np.nanmin(t["start"])), float(np.nanmax(end)), nbins + 1)
    images, _ = np.histogram(end, bins=edges, weights=t["images"])
    rate = images / np.diff(edges)
    fig = _figure()
    ax = fig.add_subplot()
    ax.stairs(rate, edges, fill=True, alpha=0.35, color=PALETTE[0])
    ax.stairs(rate, edges, color=PALETTE[0], label="images/s (images written per time bin)")
    label = "steady" if s["warmup_excluded"] else "whole run"
    ax.axhline(s["images_per_s"], color=PALETTE[3], ls="--", label=f"{label}: {s['images_per_s']:.1f} images/s")
    if s["warmup_s"] > 0:
        ax.axvspan(edges[0], edges[0] + s["warmup_s"], color="#999", alpha=0.2, label="warm-up")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("images/s")
    ax.set_title("Throughput over time")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _svg(fig)


def plot_stages(t: dict, s: dict) -> str:
    stages = t["stages"]
    fig = _figure(6.4, 3.6)
    timeline_ax, share_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    n = min(len(t["end"]), TIMELINE_BATCHES)
    for row, stage in enumerate(stages):
        spans = [(t[f"{stage}_start"][i], t[f"{stage}_s"][i]) for i in range(n)]
        colors = [PALETTE[i % 2] for i in range(n)]  # alternate so neighbouring batches are told apart
        timeline_ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=colors)
    timeline_ax.set_yticks(range(len(stages)), stages)
    timeline_ax.invert_yaxis()
    timeline_ax.set_xlabel("seconds")
    timeline_ax.set_title(f"First {n} batches through the stages", fontsize=10)
    shares = [s["stage_busy_share"][st] * 100 for st in stages]
    colors = [PALETTE[3] if st == s["bottleneck"] else PALETTE[0] for st in stages]
    share_ax.barh(range(len(stages)), shares, color=colors)
    share_ax.set_yticks(range(len(stages)), stages)
    share_ax.invert_yaxis()
    share_ax.set_xlabel("% of the run busy\n(red: the bottleneck)")
    share_ax.set_title("Busy share", fontsize=10)
    return _svg(fig)


def plot_batch_sizes(s: dict) -> str:
    sizes = s["batch_size_hist"]
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar([str(k) for k in sizes], list(sizes.values()), color=PALETTE[0])
    ax.set_xlabel("images per batch")
    ax.set_ylabel("batches")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Batch sizes")
    return _svg(fig)


def plot_classes(s: dict, top: int = 20) -> str:
    items = list(s["per_class"].items())[:top]
    fig = _figure(6.4, max(2.2, 0.28 * len(items) + 1.0))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color=PALETTE[2])
    ax.invert_yaxis()
    ax.set_xlabel("detections")
    ax.set_title(f"Detections per class (top {len(items)} of {len(s['per_class'])})")
    return _svg(fig)


def plot_scores(s: dict) -> str:
    h = s["score_hist"]
    fig = _figure()
    ax = fig.add_subplot()
    ax.stairs(h["counts"], h["edges"], fill=True, color=PALETTE[4])
    ax.set_xlabel("score")
    ax.set_ylabel("detections")
    ax.set_title("Score distribution")
    return _svg(fig)


def plot_pr(e: dict) -> str:
    """Precision against recall at IoU .50, one curve per class (from `bulkdet eval`)."""
    fig = _figure()
    ax = fig.add_subplot()
    recall = e["recall_thresholds"]
    for i, (name, c) in enumerate(e["per_class"].items()):
        if c.get("pr50"):
            ax.plot(recall, c["pr50"], color=PALETTE[i % len(PALETTE)], label=f"{name} (AP@.5 {c['ap50']:.3f})")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall at IoU .50 against {Path(e['labels']).name}")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _svg(fig)


# ----------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------

def pick_samples(run_dir: Path, k: int = N_SAMPLES) -> list[dict]:
    """Up to k images with detections, spread evenly over the run (by image id)."""
    rows = list(iter_images(run_dir, ["image_id", "path", "width", "height", "n_det", "status"],
                            filter=pc.field("status").isin(RESULT_STATUSES) & (pc.field("n_det") > 0)))
    if not rows:
        return []
    found = pa.Table.from_batches(rows).sort_by("image_id")
    if not len(found):
        return []
    picks = np.unique(np.linspace(0, len(found) - 1, min(k, len(found))).round().astype(int))
    return found.take(picks).to_pylist()


def sample_boxes(run_dir: Path, image_ids: list[int]) -> dict[int, list[dict]]:
    boxes: dict[int, list[dict]] = {i: [] for i in image_ids}
    for batch in iter_detections(run_dir, ["image_id", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"],
                                 filter=pc.field("image_id").isin(image_ids)):
        for row in batch.to_pylist():
            boxes[row["image_id"]].append(row)
    return boxes


def encoded_bytes(dataset: Path, image_ids: list[int], storage_options: dict | None = None) -> dict:
    """image id -> the original file bytes, from the dataset (its shards, or the source when packed
    by reference, read with `storage_options`), or the Unreadable saying why they can't be read
    (or changed); an image the manifest lacks is left out."""
    from bulkdet.store.manifest import read_manifest
    from bulkdet.store.readers import open_dataset_reader

    manifest = read_manifest(dataset).select(["image_id", "shard", "key"])
    rows = manifest.filter(pc.is_in(manifest.column("image_id"), pa.array(image_ids, pa.int64()))).to_pylist()
    reader = open_dataset_reader(Path(dataset), storage_options=storage_options)
    try:
        return {r["image_id"]: reader.read(r["shard"], [r["image_id"]], [r["key"]])[0] for r in rows if r["shard"] >= 0}
    finally:
        reader.close()


def draw_sample(data: bytes, boxes: list[dict]) -> str:
    """Upright image with its boxes drawn, as a base64 JPEG data URI."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    scale = min(4.0, SAMPLE_SIDE / max(img.size))  # small images are enlarged (up to 4x) to be seen
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    boxes = sorted(boxes, key=lambda b: -b["score"])
    for rank, b in enumerate(boxes):
        color = PALETTE[b["class_id"] % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in (b["x1"], b["y1"], b["x2"], b["y2"]))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
        if rank >= LABELLED_BOXES:
            continue
        label = f"{b['class_name']} {b['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        ty = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1
        draw.rectangle((x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 4), fill=color)
        draw.text((x1 + 2, ty + 2 - (top - y1)), label, fill="white", font=font)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def dataset_of(run: dict) -> Path | None:
    for candidate in (run.get("dataset"), run.get("config", {}).get("dataset")):
        if candidate and (Path(candidate) / "manifest.parquet").exists():
            return Path(candidate)
    return None


def samples_html(run_dir: Path, run: dict, storage_options: dict | None = None) -> str:
    picks = pick_samples(run_dir)
    if not picks:
        return "<p>No image with detections to show.</p>"
    dataset = dataset_of(run)
    if dataset is None:
        where = run.get("dataset") or run.get("config", {}).get("dataset")
        return f"<p>Samples not shown: the dataset {html.escape(str(where))} is not there any more.</p>"
    ids = [p["image_id"] for p in picks]
    data = encoded_bytes(dataset, ids, storage_options)
    boxes = sample_boxes(run_dir, ids)
    cells = []
    for p in picks:
        caption = f"{html.escape(p['path'])} ({p['width']}×{p['height']}, {p['n_det']} detections)"
        got = data.get(p["image_id"])
        if not isinstance(got, bytes):  # not in the manifest, or an Unreadable
            why = "bytes not found in the dataset" if got is None else f"not read ({got.status}: {got.error})"
            cells.append(f"<figure><figcaption>{caption}: {html.escape(why)}</figcaption></figure>")
            continue
        uri = draw_sample(got, boxes[p["image_id"]])
        cells.append(f'<figure><img class="sample" src="{uri}" alt="{html.escape(p["path"])}">'
                     f"<figcaption>{caption}</figcaption></figure>")
    return '<div class="samples">' + "".join(cells) + "</div>"


# ----------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------

def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _failures_html(s: dict) -> str:
    if not s["failed"]:
        return "<p>No failed input.</p>"
    rows = []
    for status, n in s["by_status"].items():
        if status == "ok":
            continue
        first = "<br>".join(f"{html.escape(f['path'])}: {html.escape(str(f['error']))}"
                            for f in s["first_failures"].get(status, []))
        rows.append(f'<tr><td>{html.escape(status)}</td><td class="num">{n}</td><td>{first}</td></tr>')
    return "<table><tr><th>status</th><th>images</th><th>first paths</th></tr>" + "".join(rows) + "</table>"


def render_html(run_dir: Path, storage_options: dict | None = None) -> str:
    """The page; `storage_options`: for the sample images of a dataset packed by reference from a
    URL (credentials: never written into the page)."""
    run_dir = Path(run_dir)
    run = read_run_json(run_dir)
    s = summarize(run_dir)
    cards = [_card(f"{s['images']:,}", "images"), _card(f"{s['failed']:,}", "failed"),
             _card(f"{s['detections']:,}", "detections")]
    plots = []
    metrics = read_metrics(run_dir)
    if metrics is not None and len(metrics):
        t = timeline(metrics)
        rate_label = "images/s (warm-up excluded)" if s["warmup_excluded"] else "images/s (whole run)"
        cards += [_card(f"{s['images_per_s']:.1f}", rate_label),
                  _card(f"{s['megapixels_per_s']:.1f}", "megapixels/s"),
                  _card(f"{s['latency_s']['p50']:.3f} s", "batch latency p50"),
                  _card(s["bottleneck"], "bottleneck stage"),
                  _card(f"{s['padding_share']:.1%}", "padding waste")]
        plots += [plot_throughput(t, s), plot_stages(t, s), plot_batch_sizes(s)]
    if s["per_class"]:
        plots += [plot_classes(s), plot_scores(s)]
    if "eval" in s:
        cards += [_card(f"{s['eval']['map50_95']:.3f}", "mAP@[.5:.95]"), _card(f"{s['eval']['map50']:.3f}", "mAP@.5")]
        if s["eval"]["recall_thresholds"]:
            plots.append(plot_pr(s["eval"]))
    figures = "".join(f'<figure class="plot">{p}</figure>' for p in plots)
    meta = (f"run {s['run_id']} ({s['state']}) · device {s['device']} · backend {s['backend']} · "
            f"provider {s['provider']} · precision {s['precision']} · model {s['model']}")
    config = html.escape(json.dumps({"config": run.get("config"), "environment": run.get("environment")},
                                    indent=2, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bulkdet report {html.escape(str(s['run_id']))}</title>
<style>{CSS}</style></head>
<body>
<h1>bulkdet report</h1>
<div class="meta">{html.escape(meta)}<br>{html.escape(str(run_dir))}</div>
<div class="cards">{''.join(cards)}</div>
<h2>Plots</h2>
<div class="plots">{figures or '<p>No batch was processed in this run.</p>'}</div>
<h2>Samples</h2>
{samples_html(run_dir, run, storage_options)}
<h2>Failures</h2>
{_failures_html(s)}
<h2>Configuration</h2>
<details><summary>config and environment</summary><pre>{config}</pre></details>
</body></html>
"""


def write_html(run_dir: Path, path: Path, storage_options: dict | None = None) -> Path:
    """The page, written atomically: a failure never leaves half a page at `path`."""
    return write_text_atomic(render_html(run_dir, storage_options), path, per_process=True)
