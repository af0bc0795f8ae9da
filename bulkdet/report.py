"""`bulkdet report`: what a run found and where its time went."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from bulkdet.metrics import STAGES
from bulkdet.sink import read_detections, read_images


def summarize(run_dir: Path) -> dict:
    """Everything the report shows, as plain data (also the --json output)."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    images = read_images(run_dir, ["path", "width", "height", "status", "error", "n_det"])
    dets = read_detections(run_dir, ["class_name"])
    status = Counter(images.column("status").to_pylist())
    failures = images.filter(pc.not_equal(images.column("status"), "ok"))
    per_class = Counter(str(c) for c in dets.column("class_name").to_pylist())
    ok = images.filter(pc.equal(images.column("status"), "ok"))
    megapixels = float(pc.sum(pc.multiply(ok.column("width").cast("int64"),
                                          ok.column("height").cast("int64"))).as_py() or 0) / 1e6
    out = {
        "run_id": run.get("run_id"), "state": run.get("state"), "device": run.get("device"),
        "backend": run.get("backend"), "provider": run.get("provider"),
        "model": run.get("model", {}).get("path"),
        "images": len(images), "ok": status.get("ok", 0), "failed": len(images) - status.get("ok", 0),
        "by_status": dict(status), "detections": len(dets),
        "first_failures": [{"path": p, "status": s, "error": e} for p, s, e in zip(
            failures.column("path").to_pylist()[:5], failures.column("status").to_pylist()[:5],
            failures.column("error").to_pylist()[:5])],
        "per_class": dict(per_class.most_common()),
    }
    metrics_path = run_dir / "metrics.parquet"
    if metrics_path.exists():
        m = pq.read_table(metrics_path).to_pydict()
        processed = sum(m["batch_size"])
        start = min(m["read_start"])
        end = max(m["write_end"])
        elapsed = max(end - start, 1e-9)
        orig_mp = sum(m["original_pixels"]) / 1e6
        stage_s = {s: sum(m[f"{s}_s"]) for s in STAGES}
        out.update(
            processed=processed, elapsed_s=elapsed, images_per_s=processed / elapsed,
            megapixels_per_s=orig_mp / elapsed, stage_s=stage_s,
            stage_busy_share={s: v / elapsed for s, v in stage_s.items()},
            bottleneck=max(stage_s, key=stage_s.get),
        )
    else:
        out.update(megapixels=megapixels)
    return out


def print_report(run_dir: Path, console: Console | None = None) -> dict:
    console = console or Console()
    s = summarize(run_dir)
    console.print(f"[bold]bulkdet run[/bold] {s['run_id']}  ({s['state']})  device={s['device']} "
                  f"backend={s['backend']} provider={s['provider']}")
    console.print(f"images: {s['images']}  ok: {s['ok']}  failed: {s['failed']}  detections: {s['detections']}")
    if "images_per_s" in s:
        console.print(f"throughput: {s['images_per_s']:.1f} images/s, {s['megapixels_per_s']:.1f} megapixels/s "
                      f"over {s['elapsed_s']:.2f} s ({s['processed']} images processed in this run)")
        t = Table(title="time per stage")
        for col in ("stage", "busy s", "busy share"):
            t.add_column(col, justify="right" if col != "stage" else "left")
        for stage, secs in s["stage_s"].items():
            mark = "  <- bottleneck" if stage == s["bottleneck"] else ""
            t.add_row(stage + mark, f"{secs:.3f}", f"{s['stage_busy_share'][stage]:.0%}")
        console.print(t)
    if s["failed"]:
        t = Table(title="failures by status")
        t.add_column("status")
        t.add_column("images", justify="right")
        for status, n in sorted(s["by_status"].items(), key=lambda kv: -kv[1]):
            if status != "ok":
                t.add_row(status, str(n))
        console.print(t)
        for f in s["first_failures"]:
            console.print(f"  {f['status']}: {f['path']}: {f['error']}", markup=False)
    if s["per_class"]:
        t = Table(title="detections per class (top 10)")
        t.add_column("class")
        t.add_column("detections", justify="right")
        for name, n in list(s["per_class"].items())[:10]:
            t.add_row(name, str(n))
        console.print(t)
    return s
