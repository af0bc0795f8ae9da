"""End to end through the CLI: pack + run with the analytic detector gives exact boxes."""

import duckdb
import pyarrow.parquet as pq

from bulkdet.demo import compare_with_truth
from conftest import RUNNER_STATUS_RULES_TODO, make_images

# 64 px to 2000 px, square, very tall, very wide, JPEG and PNG, EXIF orientations 1, 3, 6, 8.
SPECS = [
    ("square_small.jpg", 64, 64, "jpeg", 1),
    ("tall.jpg", 64, 2000, "jpeg", 3),
    ("wide.png", 2000, 64, "png", 6),
    ("hd.jpg", 1920, 1080, "jpeg", 8),
    ("portrait.png", 1080, 1920, "png", 3),
    ("big.jpg", 2000, 1500, "jpeg", 6),
    ("odd.png", 333, 517, "png", 8),
    ("narrow.jpg", 100, 1200, "jpeg", 6),
    ("flat.png", 1200, 100, "png", 8),
    ("sub/dir/mid.jpg", 640, 480, "jpeg", 3),
    ("sub/exact.png", 640, 640, "png", 1),
    ("sub/tiny_wide.jpg", 300, 64, "jpeg", 8),
]


def test_exact_boxes_every_size_format_orientation(tmp_path, analytic_model, cli):
    truth = make_images(tmp_path / "src", SPECS, seed=3)
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "--max-batch", "5", "-q")
    assert r.exit_code == 0, r.output

    images = duckdb.sql(f"SELECT path, status, width, height, n_det FROM '{tmp_path}/run/images/*.parquet'").fetchall()
    assert sorted(p for p, *_ in images) == sorted(t["path"] for t in truth)  # one row per file
    assert {s for _, s, *_ in images} == {"ok"}
    sizes = {p: (w, h) for p, _, w, h, _ in images}
    assert all(sizes[t["path"]] == (t["width"], t["height"]) for t in truth)  # upright sizes
    dets = duckdb.sql(f"SELECT path, class_id, class_name, x1, y1, x2, y2 FROM '{tmp_path}/run/detections/*.parquet'")
    rows = [dict(zip(dets.columns, r)) for r in dets.fetchall()]
    assert compare_with_truth(truth, rows) == []
    assert {r["class_name"] for r in rows} <= {"red", "green", "blue"}
    assert sum(n for *_, n in images) == len(rows) == sum(len(t["rects"]) for t in truth)


def test_non_image_gets_error_row_and_exit_code_3(tmp_path, analytic_model, cli):
    make_images(tmp_path / "src", [("good.jpg", 200, 100, "jpeg", 1)])
    (tmp_path / "src" / "readme.txt").write_text("not an image")
    (tmp_path / "src" / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg header")
    cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q")
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 3
    assert "2 input(s) failed" in r.output and "duckdb" in r.output
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "run" / "images").to_pylist()}
    assert set(rows) == {"good.jpg", "readme.txt", "fake.jpg"}
    assert rows["good.jpg"]["status"] == "ok" and rows["good.jpg"]["n_det"] >= 1
    for bad in ("readme.txt", "fake.jpg"):
        assert rows[bad]["status"] != "ok" and rows[bad]["error"]


@RUNNER_STATUS_RULES_TODO
def test_corrupt_jpeg_in_batch_costs_only_its_row(tmp_path, analytic_model, cli):
    truth = make_images(tmp_path / "src", [(f"g{i}.jpg", 160 + 10 * i, 120, "jpeg", 1) for i in range(5)])
    good = (tmp_path / "src" / "g0.jpg").read_bytes()
    # A valid header (so pack stores it) with the entropy-coded data cut off.
    (tmp_path / "src" / "g2_broken.jpg").write_bytes(good[: len(good) // 3])
    cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q")
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "--max-batch", "8", "-q")
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "run" / "images").to_pylist()}
    assert len(rows) == 6
    dets = pq.read_table(tmp_path / "run" / "detections").to_pylist()
    assert compare_with_truth(truth, [d for d in dets if d["path"] != "g2_broken.jpg"]) == []
    assert all(rows[t["path"]]["status"] == "ok" for t in truth)
    broken = rows["g2_broken.jpg"]
    # Truncated JPEGs may decode partially (gray rest) or fail: either way one row, never a crash.
    assert broken["status"] in ("ok", "decode_error")
    assert r.exit_code == (3 if broken["status"] != "ok" else 0)


def test_names_file_overrides_metadata(tmp_path, analytic_model, cli):
    make_images(tmp_path / "src", [("a.jpg", 300, 200, "jpeg", 1)])
    (tmp_path / "names.txt").write_text("rouge\nvert\nbleu\n")
    cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q")
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "--names",
            tmp_path / "names.txt", "-q")
    assert r.exit_code == 0, r.output
    names = {d["class_name"] for d in pq.read_table(tmp_path / "run" / "detections").to_pylist()}
    assert names and names <= {"rouge", "vert", "bleu"}
