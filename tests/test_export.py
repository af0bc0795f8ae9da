"""`bulkdet export`: each format read back by its consumer (or its documented field rules)
carries the run's boxes within a pixel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bulkdet.synthetic import CLASS_NAMES
from bulkdet.store.parts import read_detections, read_images

NAMES = list(CLASS_NAMES)


def run_boxes(run_dir: Path) -> dict[str, list[tuple]]:
    """path -> sorted [(class_id, score, x1, y1, x2, y2)] as the run stored them."""
    out: dict[str, list[tuple]] = {}
    for d in read_detections(run_dir).to_pylist():
        out.setdefault(d["path"], []).append((d["class_id"], d["score"], d["x1"], d["y1"], d["x2"], d["y2"]))
    return {p: sorted(v) for p, v in out.items()}


def image_rows(run_dir: Path) -> dict[str, dict]:
    return {r["path"]: r for r in read_images(run_dir).to_pylist()}


def assert_same_boxes(got: dict[str, list[tuple]], want: dict[str, list[tuple]], tol: float = 1.0):
    assert set(got) == set(want)
    for path in want:
        g, w = sorted(got[path]), sorted(want[path])
        assert [b[0] for b in g] == [b[0] for b in w], path
        np.testing.assert_allclose(np.array([b[2:] for b in g]), np.array([b[2:] for b in w]), atol=tol,
                                   err_msg=path)
        np.testing.assert_allclose([b[1] for b in g], [b[1] for b in w], atol=1e-3)


def truth_coco(truth: list[dict], run_dir: Path, shift: float = 0.0, drop_class: int | None = None) -> dict:
    """The demo's truth as a COCO ground truth with its own image and category ids; boxes moved
    by `shift` times their width, or a class dropped, to make wrong labels."""
    images, anns = [], []
    for i, t in enumerate(truth):
        images.append({"id": 1000 + i, "file_name": t["path"], "width": t["width"], "height": t["height"]})
        for c, x1, y1, x2, y2 in t["rects"]:
            if c == drop_class:
                continue
            dx = shift * (x2 - x1)
            anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": 10 + c,
                         "bbox": [x1 + dx, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 10 + c, "name": n} for c, n in enumerate(NAMES)]}


def test_coco_loads_in_pycocotools_and_scores_map50_1_against_truth(demo_run, cli, tmp_path):
    run = demo_run["run"]
    out = tmp_path / "dets.coco.json"
    r = cli("export", run, "--format", "coco", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob("*.tmp"))
    data = json.loads(out.read_text())
    images = image_rows(run)
    ok = {p for p, r in images.items() if r["status"] == "ok"}
    assert {i["file_name"] for i in data["images"]} == ok  # the failed image is left out
    assert data["categories"] == [{"id": c + 1, "name": n} for c, n in enumerate(NAMES)]
    for a in data["annotations"]:
        assert a["iscrowd"] == 0 and a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.05)
    by_id = {i["id"]: i["file_name"] for i in data["images"]}
    got: dict[str, list[tuple]] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        got.setdefault(by_id[a["image_id"]], []).append((a["category_id"] - 1, a["score"], x, y, x + w, y + h))
    assert_same_boxes(got, run_boxes(run))

    # pycocotools reads the file as a dataset and its annotations as results (loadRes).
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == len(ok) and len(coco.getAnnIds()) == len(data["annotations"])
    gt = COCO()
    gt.dataset = {**truth_coco(demo_run["truth"], run), "categories": data["categories"]}
    for a in gt.dataset["annotations"]:
        a["category_id"] -= 9  # the export's ids: class id + 1
    for im in gt.dataset["images"]:  # the export's image ids: the run's
        im["id"] = images[im["file_name"]]["image_id"]
    by_old = {1000 + i: images[t["path"]]["image_id"] for i, t in enumerate(demo_run["truth"])}
    for a in gt.dataset["annotations"]:
        a["image_id"] = by_old[a["image_id"]]
    gt.createIndex()
    E = COCOeval(gt, gt.loadRes(data["annotations"]), "bbox")
    E.evaluate()
    E.accumulate()
    E.summarize()
    assert E.stats[1] == 1.0  # mAP@.5 on the analytic detector's exact data


def test_megadetector_follows_the_format_rules(demo_run, cli, tmp_path):
    run = demo_run["run"]
    out = tmp_path / "md.json"
    assert cli("export", run, "--format", "megadetector", "--out", out, "-q").exit_code == 0
    md = json.loads(out.read_text())
    info = md["info"]
    float(info["format_version"])  # a string-formatted float
    assert isinstance(info["format_version"], str) and info["format_version"].startswith("1.")
    assert info["detector"] == "analytic.onnx"
    assert info["detector_metadata"]["typical_detection_threshold"] == 0.25
    assert len(info["detection_completion_time"]) == 19  # YYYY-mm-dd HH:MM:SS
    cats = md["detection_categories"]
    assert cats == {"1": "red", "2": "green", "3": "blue"}  # string keys, "0" (empty) unused
    images = image_rows(run)
    assert {im["file"] for im in md["images"]} == set(images)
    got: dict[str, list[tuple]] = {}
    for im in md["images"]:
        row = images[im["file"]]
        if row["status"] != "ok":
            assert im["detections"] is None and row["status"] in im["failure"]
            continue
        assert isinstance(im["detections"], list) and "failure" not in im
        for d in im["detections"]:
            assert d["category"] in cats and 0 <= d["conf"] <= 1
            x, y, w, h = d["bbox"]
            assert all(0 <= v <= 1 for v in d["bbox"]) and x + w <= 1.0001 and y + h <= 1.0001
            W, H = row["width"], row["height"]
            got.setdefault(im["file"], []).append((int(d["category"]) - 1, d["conf"], x * W, y * H,
                                                   (x + w) * W, (y + h) * H))
    assert "set_a/broken.jpg" in images and images["set_a/broken.jpg"]["status"] != "ok"
    assert_same_boxes(got, run_boxes(run))


def test_labelstudio_percent_boxes_and_image_root(demo_run, cli, tmp_path):
    run = demo_run["run"]
    out = tmp_path / "ls.json"
    r = cli("export", run, "--format", "labelstudio", "--out", out, "--image-root", "/data/local-files/?d=", "-q")
    assert r.exit_code == 0, r.output
    tasks = json.loads(out.read_text())
    images = image_rows(run)
    got: dict[str, list[tuple]] = {}
    for task in tasks:
        path = task["data"]["image"].removeprefix("/data/local-files/?d=")
        assert task["data"]["image"] == "/data/local-files/?d=" + path
        pred, = task["predictions"]
        assert pred["model_version"] and 0 <= pred["score"] <= 1
        W, H = images[path]["width"], images[path]["height"]
        for res in pred["result"]:
            assert res["type"] == "rectanglelabels" and res["from_name"] == "label" and res["to_name"] == "image"
            assert (res["original_width"], res["original_height"]) == (W, H)
            v = res["value"]
            assert v["rotation"] == 0 and len(v["rectanglelabels"]) == 1
            assert all(0 <= v[k] <= 100 for k in ("x", "y", "width", "height"))
            got.setdefault(path, []).append((NAMES.index(v["rectanglelabels"][0]), res["score"],
                                             v["x"] / 100 * W, v["y"] / 100 * H,
                                             (v["x"] + v["width"]) / 100 * W, (v["y"] + v["height"]) / 100 * H))
    ok = {p for p, r in images.items() if r["status"] == "ok"}
    assert {t["data"]["image"].removeprefix("/data/local-files/?d=") for t in tasks} == ok
    assert_same_boxes(got, run_boxes(run))


def test_yolo_mirrors_the_source_tree_with_classes_txt(demo_run, cli, tmp_path):
    run = demo_run["run"]
    out = tmp_path / "labels"
    assert cli("export", run, "--format", "yolo", "--out", out, "-q").exit_code == 0
    assert (out / "classes.txt").read_text().splitlines() == NAMES
    images = image_rows(run)
    ok = {p for p, r in images.items() if r["status"] == "ok"}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.txt") if p.name != "classes.txt"}
    assert written == {str(Path(p).with_suffix(".txt")) for p in ok}
    assert any("/" in w for w in written) and not list(out.rglob("*.tmp"))
    got: dict[str, list[tuple]] = {}
    for path in ok:
        W, H = images[path]["width"], images[path]["height"]
        for line in (out / Path(path).with_suffix(".txt")).read_text().splitlines():
            c, xc, yc, w, h, conf = line.split()
            xc, yc, w, h = float(xc) * W, float(yc) * H, float(w) * W, float(h) * H
            got.setdefault(path, []).append((int(c), float(conf), xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2))
    assert_same_boxes(got, run_boxes(run))


def test_csv_columns_and_values(demo_run, cli, tmp_path):
    run = demo_run["run"]
    out = tmp_path / "dets.csv"
    assert cli("export", run, "--format", "csv", "--out", out, "-q").exit_code == 0
    assert out.read_text().splitlines()[0] == \
        '"path","image_id","class_id","class_name","score","x1","y1","x2","y2","width","height"'
    rows = pacsv.read_csv(out).to_pylist()
    images = image_rows(run)
    assert len(rows) == len(read_detections(run))
    for r in rows:
        assert NAMES[r["class_id"]] == r["class_name"]
        assert (r["width"], r["height"]) == (images[r["path"]]["width"], images[r["path"]]["height"])
        assert r["image_id"] == images[r["path"]]["image_id"]
    got: dict[str, list[tuple]] = {}
    for r in rows:
        got.setdefault(r["path"], []).append((r["class_id"], r["score"], r["x1"], r["y1"], r["x2"], r["y2"]))
    assert_same_boxes(got, run_boxes(run), tol=1e-3)


def test_classes_filter_and_unknown_class(demo_run, cli, tmp_path):
    run = demo_run["run"]
    out = tmp_path / "blue.csv"
    r = cli("export", run, "--format", "csv", "--out", out, "--classes", "blue,0", "--conf", "0.5", "-q")
    assert r.exit_code == 0, r.output
    rows = pacsv.read_csv(out).to_pylist()
    want = [d for d in read_detections(run).to_pylist() if d["class_id"] in (0, 2)]
    assert len(rows) == len(want) > 0 and {r["class_name"] for r in rows} == {"red", "blue"}
    r = cli("export", run, "--format", "csv", "--out", tmp_path / "x.csv", "--classes", "zebra")
    assert r.exit_code == 2 and "unknown class 'zebra'" in r.output and "red" in r.output
    assert not (tmp_path / "x.csv").exists()


def test_never_replaces_a_file_without_overwrite(demo_run, cli, tmp_path):
    run = demo_run["run"]
    mine = tmp_path / "notes.json"
    mine.write_text("my own notes")
    r = cli("export", run, "--format", "coco", "--out", mine)
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    assert mine.read_text() == "my own notes"
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    assert cli("export", run, "--format", "yolo", "--out", folder).exit_code == 2
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert cli("export", run, "--format", "coco", "--out", mine, "--overwrite", "-q").exit_code == 0
    assert json.loads(mine.read_text())["annotations"]
    r = cli("export", tmp_path, "--format", "coco", "--out", tmp_path / "y.json")
    assert r.exit_code == 1 and "run.json" in r.output


def test_bad_format_is_a_usage_error(demo_run, cli, tmp_path):
    r = cli("export", demo_run["run"], "--format", "voc", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "voc" in r.output
    r = cli("export", demo_run["run"], "--format", "csv", "--out", tmp_path / "x", "--image-root", "/x")
    assert r.exit_code == 2


def test_slicing_a_part_changes_nothing(demo_run, cli, tmp_path, monkeypatch):
    import bulkdet.results.export as export

    whole = tmp_path / "whole.json"
    assert cli("export", demo_run["run"], "--format", "megadetector", "--out", whole, "-q").exit_code == 0
    monkeypatch.setattr(export, "ROWS_AT_ONCE", 2)  # parts hold 5 images: slices of 2, 2, 1
    sliced = tmp_path / "sliced.json"
    assert cli("export", demo_run["run"], "--format", "megadetector", "--out", sliced, "-q").exit_code == 0
    assert sliced.read_text() == whole.read_text()
