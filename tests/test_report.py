"""metrics.parquet, `bulkdet report` (terminal, --json, two runs), and progress lines."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import make_images

from bulkdet.run.metrics import STAGES, metrics_schema
from bulkdet.run.plan import default_pixel_budget, letterbox, plan
from bulkdet.run.progress import Progress
from bulkdet.results.report import HINTS, summarize, timing_summary
from bulkdet.store.parts import read_detections, read_images
from bulkdet.store.manifest import read_manifest

SPECS = [(f"f{i % 2}/img_{i:02d}.{'jpg' if i % 2 else 'png'}", 60 + 41 * i, 50 + 29 * (i % 5),
          "jpeg" if i % 2 else "png", (1, 6, 3, 8)[i % 4]) for i in range(11)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, analytic_model):
    """A dataset with 11 good and 2 bad files, run twice with different batch sizes."""
    from bulkdet.ingest.pack import pack
    from bulkdet.run.runner import RunConfig, run

    root = tmp_path_factory.mktemp("report")
    make_images(root / "src", SPECS)
    (root / "src" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "src" / "notes.txt").write_text("not an image")
    pack(root / "src", root / "ds", quiet=True)
    run(RunConfig(root / "ds", analytic_model, root / "a", imgsz=192, max_batch=4, quiet=True))
    run(RunConfig(root / "ds", analytic_model, root / "b", imgsz=128, max_batch=8, quiet=True))
    return root


def planned_batches(runs):
    """The batches run "a" planned: aspect buckets of at most 4 images (--imgsz 192)."""
    manifest = read_manifest(runs / "ds")
    good = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    return list(plan(good, 192, 4, pixel_budget=default_pixel_budget("cpu", 192, 4)))


def test_metrics_one_row_per_batch_with_pixels_bytes_and_stage_times(runs):
    m = pq.read_table(runs / "a" / "metrics.parquet")
    assert m.schema == metrics_schema()
    rows = m.to_pylist()
    manifest = read_manifest(runs / "ds")
    good = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    # One row per planned batch (aspect buckets of at most 4 images), every image once.
    batches = planned_batches(runs)
    assert [r["batch_size"] for r in rows] == [len(b) for b in batches] and sum(len(b) for b in batches) == 11
    assert sorted(r["batch_id"] for r in rows) == list(range(len(batches)))
    assert {r["device"] for r in rows} == {"cpu"}
    assert {r["run_id"] for r in rows} == {json.loads((runs / "a" / "run.json").read_text())["run_id"]}
    assert [(r["input_h"], r["input_w"]) for r in rows] == [b.input_hw for b in batches]
    w = good.column("width").to_numpy().astype(np.int64)
    h = good.column("height").to_numpy().astype(np.int64)
    assert sum(r["original_pixels"] for r in rows) == int((w * h).sum())
    assert sum(r["encoded_bytes"] for r in rows) == pc.sum(good.column("bytes")).as_py()
    computed = sum(len(b) * b.input_hw[0] * b.input_hw[1] for b in batches)
    assert sum(r["input_pixels"] for r in rows) == computed < 11 * 192 * 192
    lb = letterbox(w, h, 192, 192)  # buckets resize as square letterboxing does, and pad less
    assert sum(r["padding_pixels"] for r in rows) == computed - int((lb.new_w.astype(np.int64) * lb.new_h).sum())
    for r in rows:
        for stage in STAGES:
            assert r[f"{stage}_start"] <= r[f"{stage}_end"]
            assert r[f"{stage}_s"] == pytest.approx(r[f"{stage}_end"] - r[f"{stage}_start"])
            assert 0 <= r[f"{stage}_queue"] <= 2
        # A batch goes through the stages in order.
        ends = [r[f"{s}_end"] for s in STAGES]
        starts = [r[f"{s}_start"] for s in STAGES]
        assert all(e <= s for e, s in zip(ends[:-1], starts[1:]))


def test_summary_counts_match_the_parquet_output(runs):
    s = summarize(runs / "a")
    images = read_images(runs / "a")
    dets = read_detections(runs / "a")
    assert (s["images"], s["ok"], s["failed"]) == (13, 11, 2)
    assert s["by_status"] == dict(zip(*np.unique(images.column("status").to_pylist(), return_counts=True)))
    failed_paths = {p for p, st in zip(images.column("path").to_pylist(), images.column("status").to_pylist())
                    if st != "ok"}
    assert {f["path"] for fs in s["first_failures"].values() for f in fs} == failed_paths == {"broken.jpg", "notes.txt"}
    assert s["detections"] == len(dets) > 0
    names = [str(n) for n in dets.column("class_name").to_pylist()]
    assert s["per_class"] == {n: names.count(n) for n in set(names)}
    assert sum(s["score_hist"]["counts"]) == len(dets)
    sizes = [len(b) for b in planned_batches(runs)]
    assert s["processed"] == 11 and s["batches"] == len(sizes)
    assert s["batch_size_hist"] == {n: sizes.count(n) for n in set(sizes)}
    assert s["latency_s"]["p50"] <= s["latency_s"]["p90"] <= s["latency_s"]["p99"]
    assert s["bottleneck"] == max(s["stage_s"], key=s["stage_s"].get)
    m = pq.read_table(runs / "a" / "metrics.parquet")
    assert s["padding_share"] == pytest.approx(pc.sum(m.column("padding_pixels")).as_py()
                                               / pc.sum(m.column("input_pixels")).as_py())
    assert s["images_per_s"] > 0 and s["megapixels_per_s"] > 0 and s["mb_per_s"] > 0


def _metrics(batches: list[tuple[float, float, int]], run_id: str = "r1") -> pa.Table:
    """A metrics table from (first stage start, last stage end, batch size) per batch."""
    rows = []
    for i, (start, end, size) in enumerate(batches):
        row = {"run_id": run_id, "batch_id": i, "shard": 0, "device": "cpu", "input_h": 64, "input_w": 64,
               "batch_size": size, "failed": 0, "encoded_bytes": 1_000_000 * size, "original_pixels": 100_000 * size,
               "input_pixels": 4096 * size, "padding_pixels": 1024 * size}
        for k, stage in enumerate(STAGES):  # stages one after another, each a fifth of the batch's time
            a = start + (end - start) * k / len(STAGES)
            b = start + (end - start) * (k + 1) / len(STAGES)
            row.update({f"{stage}_start": a, f"{stage}_end": b, f"{stage}_s": b - a, f"{stage}_queue": 1})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=metrics_schema())


def test_warm_up_is_excluded_from_throughput():
    # The first batch comes out after 10 s (model load, pipeline fill), then one every second.
    batches = [(0.0, 10.0, 8)] + [(9.0 + i, 11.0 + i, 8) for i in range(20)]
    s = timing_summary(_metrics(batches))
    assert s["warmup_excluded"]
    assert s["warmup_s"] == pytest.approx(10.0)
    assert s["warmup_batches"] == 1
    assert s["steady_s"] == pytest.approx(20.0)
    assert s["images_per_s"] == pytest.approx(160 / 20.0)  # warm-up excluded
    assert s["overall_images_per_s"] == pytest.approx(168 / 30.0)  # whole span
    assert s["megapixels_per_s"] == pytest.approx(160 * 0.1 / 20.0)
    assert s["mb_per_s"] == pytest.approx(160 * 1.0 / 20.0)
    assert s["padding_share"] == pytest.approx(0.25)
    assert s["latency_s"]["p50"] == pytest.approx(2.0)


def test_a_run_too_short_for_a_steady_window_is_measured_over_its_whole_span():
    # Batches in flight come out in a burst right after the first: 4 more within 0.1 s.
    batches = [(0.0, 10.0, 8)] + [(1.0 + i, 10.0 + 0.025 * (i + 1), 8) for i in range(4)]
    s = timing_summary(_metrics(batches))
    assert not s["warmup_excluded"] and s["warmup_s"] == 0
    assert s["images_per_s"] == pytest.approx(s["overall_images_per_s"]) == pytest.approx(40 / 10.1)


def test_invocations_of_a_resumed_run_are_laid_end_to_end():
    a = _metrics([(0.0, 2.0, 4)] + [(1.0 + i, 3.0 + i, 4) for i in range(10)], "first")
    b = _metrics([(0.0, 5.0, 4)] + [(4.0 + i, 6.0 + i, 4) for i in range(10)], "second")  # its own clock
    s = timing_summary(pa.concat_tables([a, b]))
    assert s["invocations"] == 2 and s["warmup_excluded"]
    assert s["elapsed_s"] == pytest.approx(12.0 + 15.0)
    assert s["warmup_s"] == pytest.approx(2.0 + 5.0)
    assert s["images_per_s"] == pytest.approx(80 / (10.0 + 10.0))


def test_resume_keeps_the_metrics_of_the_first_invocation(tmp_path, analytic_model):
    from bulkdet.ingest.pack import pack
    from bulkdet.run.runner import RunConfig, run

    make_images(tmp_path / "src", SPECS[:3])
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    cfg = RunConfig(tmp_path / "ds", analytic_model, tmp_path / "run", imgsz=128, max_batch=2, quiet=True)
    run(cfg)
    make_images(tmp_path / "src", SPECS[3:5], seed=1)  # two more files, packed into the same dataset
    pack(tmp_path / "src", tmp_path / "ds", quiet=True)
    run(cfg)  # resumes: only the two new images are processed
    m = pq.read_table(tmp_path / "run" / "metrics.parquet")
    assert len(set(m.column("run_id").to_pylist())) == 2
    assert sorted(m.column("batch_size").to_pylist()) == [1, 2, 2]
    s = summarize(tmp_path / "run")
    assert s["invocations"] == 2 and s["processed"] == 5 and s["images"] == 5


def test_cli_report_shows_throughput_stages_batches_failures_and_classes(runs, cli):
    r = cli("report", runs / "a")
    assert r.exit_code == 0, r.output
    s = summarize(runs / "a")
    for text in ("images/s", "megapixels/s", "p50 / p90 / p99", "padding waste", "where the time went",
                 f"{s['bottleneck']} ◀", "batch sizes", "failures by status", "broken.jpg", "notes.txt",
                 "unsupported", "detections per class", *s["per_class"]):
        assert text in r.output, text
    assert f"{s['images_per_s']:.1f}" in r.output


def test_cli_report_json(runs, cli):
    r = cli("report", runs / "a", "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    s = summarize(runs / "a")
    for key in ("images", "failed", "by_status", "per_class", "batch_size_hist", "bottleneck"):
        assert data[key] == json.loads(json.dumps(s[key])), key
    assert set(data["stage_busy_share"]) == set(STAGES)


def test_cli_compares_two_runs_side_by_side(runs, cli):
    r = cli("report", runs / "a", runs / "b", "--json")
    assert r.exit_code == 0
    c = json.loads(r.output)
    rows = {row["figure"]: row for row in c["rows"]}
    assert rows["max batch"]["a"] == 4 and rows["max batch"]["b"] == 8
    ips = rows["images/s"]
    assert ips["b_over_a"] == pytest.approx(ips["b"] / ips["a"])
    assert rows["images"]["a"] == rows["images"]["b"] == 13
    assert c["per_class"] == {k: {"a": v, "b": c["b"]["per_class"].get(k, 0)} for k, v in c["a"]["per_class"].items()}
    r = cli("report", runs / "a", runs / "b")
    assert r.exit_code == 0
    assert "A vs B" in r.output and "images/s" in r.output and "decode busy share" in r.output


def test_cli_report_usage_and_errors(runs, cli, tmp_path):
    assert cli("report", runs / "a", runs / "b", runs / "a").exit_code == 2
    assert cli("report", runs / "a", runs / "b", "--html", tmp_path / "x.html").exit_code == 2
    r = cli("report", tmp_path)
    assert r.exit_code == 1 and "run.json" in r.output and "not found" in r.output


def test_progress_line_has_rate_bandwidth_eta_and_failures():
    p = Progress(total=100, quiet=False, stream=io.StringIO())  # not a terminal: log lines, no bar
    assert p.bar is None
    p.update(25, nbytes=5_000_000, failed=2)
    line = p.line()
    assert line.startswith("run: 25/100 img (25%), ") and "img/s" in line and "MB/s" in line
    assert "2 failed" in line and "ETA " in line


def test_run_logs_device_and_progress_and_quiet_silences_it(runs, analytic_model, cli, caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="bulkdet"):
        r = cli("run", runs / "ds", "--model", analytic_model, "--out", tmp_path / "r1", "--imgsz", "128")
    assert r.exit_code == 3  # two inputs failed at pack
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("device=cpu backend=onnxruntime provider=CPUExecutionProvider" in m for m in messages)
    assert any(m.startswith("run: 11/11 img (100%)") and "MB/s" in m and "0 failed" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bulkdet"):
        r = cli("run", runs / "ds", "--model", analytic_model, "--out", tmp_path / "r2", "--imgsz", "128", "-q")
    assert r.exit_code == 3
    assert not [rec for rec in caplog.records if rec.getMessage().startswith("run: ")]


def test_recorder_without_a_file_keeps_rows_that_fit_the_file():
    from bulkdet.run.metrics import BatchTimes, MetricsRecorder
    from bulkdet.run.plan import Batch

    w, h = np.array([640, 100], np.int32), np.array([480, 400], np.int32)
    batch = Batch(7, 0, np.array([1, 2]), ["a", "b"], [b"", b""], w, h, (320, 320), letterbox(w, h, 320, 320))
    times = BatchTimes({s: 1.0 for s in STAGES}, {s: 1.5 for s in STAGES}, {s: 0 for s in STAGES})
    rec = MetricsRecorder("cpu", run_id="x")  # a Ray worker's: the rows go back to the driver
    rec.record(batch, times, failed=1, encoded_bytes=10)
    assert rec.close() is None
    (row,) = pa.Table.from_pylist(rec.rows, schema=metrics_schema()).to_pylist()
    assert (row["batch_id"], row["batch_size"], row["failed"], row["encoded_bytes"]) == (7, 2, 1, 10)
    # 640x480 -> 320x240 and 100x400 -> 80x320 inside 320x320.
    assert row["padding_pixels"] == 2 * 320 * 320 - (320 * 240 + 80 * 320)
    assert row["infer_s"] == pytest.approx(0.5)
    assert rec.stage_totals() == {s: pytest.approx(0.5) for s in STAGES}


def test_every_stage_has_a_hint():
    """The report names what to try for the busiest stage: for every stage, and only for stages."""
    assert list(HINTS) == list(STAGES)
