"""`bulkdet eval`: COCOeval's numbers against COCO or YOLO labels, saved in the run, in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_export import truth_coco

from bulkdet.results.evaluate import evaluate
from bulkdet.results.html_report import render_html


def write_gt(tmp_path, truth, run, **perturb) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(truth_coco(truth, run, **perturb)))
    return path


def test_truth_scores_map50_1_and_matches_pycocotools_on_the_coco_export(demo_run, cli, tmp_path):
    run, truth = demo_run["run"], demo_run["truth"]
    gt_path = write_gt(tmp_path, truth, run)
    r = cli("eval", run, "--labels", gt_path, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["map50"] == 1.0 and 0.5 < result["map50_95"] <= 1.0
    assert result["images"] == len(truth)
    assert set(result["per_class"]) == {"red", "green", "blue"}
    for c in result["per_class"].values():
        assert c["ap50"] == 1.0 and c["recall50"] == 1.0 and c["gt"] > 0

    # The same numbers as pycocotools run by hand on the COCO export, ids matched by file name.
    export = tmp_path / "dets.json"
    assert cli("export", run, "--format", "coco", "--out", export, "-q").exit_code == 0
    data = json.loads(export.read_text())
    gt = COCO(str(gt_path))
    gt_id = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    run_path = {im["id"]: im["file_name"] for im in data["images"]}
    cat = {c["id"]: c["name"] for c in data["categories"]}
    gt_cat = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    dets = [{**a, "image_id": gt_id[run_path[a["image_id"]]], "category_id": gt_cat[cat[a["category_id"]]]}
            for a in data["annotations"]]
    E = COCOeval(gt, gt.loadRes(dets), "bbox")
    E.evaluate()
    E.accumulate()
    E.summarize()
    assert result["map50_95"] == pytest.approx(E.stats[0], abs=1e-3)
    assert result["map50"] == pytest.approx(E.stats[1], abs=1e-6)


def test_wrong_labels_score_lower(demo_run, tmp_path):
    run, truth = demo_run["run"], demo_run["truth"]
    shifted = evaluate(run, write_gt(tmp_path, truth, run, shift=0.6), save=False)
    assert shifted["map50"] < 0.5 and shifted["map50_95"] < 0.5
    (tmp_path / "b").mkdir()
    dropped = evaluate(run, write_gt(tmp_path / "b", truth, run, drop_class=2), save=False)
    # Blue boxes are no longer labelled: blue detections are false positives, blue has no AP.
    assert dropped["per_class"]["blue"]["gt"] == 0 and dropped["per_class"]["blue"]["ap50"] is None
    assert dropped["map50"] == 1.0  # the other classes are still perfect
    (tmp_path / "c").mkdir()
    gt = truth_coco(truth, run)
    gt["annotations"] = gt["annotations"][::2]  # half the boxes unlabelled: detections of the rest are wrong
    (tmp_path / "c" / "gt.json").write_text(json.dumps(gt))
    assert evaluate(run, tmp_path / "c" / "gt.json", save=False)["map50"] < 1.0


def test_yolo_labels_folder(demo_run, tmp_path):
    run, truth = demo_run["run"], demo_run["truth"]
    labels = tmp_path / "labels"
    for t in truth:
        lines = [f"{c} {(x1 + x2) / 2 / t['width']} {(y1 + y2) / 2 / t['height']} {(x2 - x1) / t['width']} "
                 f"{(y2 - y1) / t['height']}" for c, x1, y1, x2, y2 in t["rects"]]
        path = labels / Path(t["path"]).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    result = evaluate(run, labels, save=False)
    assert result["labels_format"] == "yolo" and result["images"] == len(truth) and result["map50"] == 1.0
    coco = evaluate(run, write_gt(tmp_path, truth, run), save=False)
    assert result["map50_95"] == pytest.approx(coco["map50_95"], abs=1e-6)
    # classes.txt names the label ids: here the labels count blue as 0, red as 2.
    (labels / "classes.txt").write_text("blue\ngreen\nred\n")
    assert evaluate(run, labels, save=False)["map50"] < 0.7


def test_saved_eval_shows_in_report(demo_run, cli, tmp_path):
    run = demo_run["run"]
    assert cli("eval", run, "--labels", write_gt(tmp_path, demo_run["truth"], run)).exit_code == 0
    try:
        r = cli("report", run)
        assert r.exit_code == 0 and "mAP@.5 1.000" in r.output and "AP@[.5:.95]" in r.output
        assert json.loads(cli("report", run, "--json").output)["eval"]["map50"] == 1.0
        page = render_html(run)
        assert "Precision-recall at IoU .50" in page and "mAP@.5" in page
    finally:
        (run / "eval.json").unlink()  # the shared run folder stays as the other tests expect


def test_unmatched_labels_are_a_clear_usage_error(demo_run, cli, tmp_path):
    gt = truth_coco(demo_run["truth"], demo_run["run"])
    for im in gt["images"]:
        im["file_name"] = "elsewhere/" + im["file_name"]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    r = cli("eval", demo_run["run"], "--labels", tmp_path / "gt.json")
    assert r.exit_code == 2 and "no image of the run" in r.output and "Traceback" not in r.output
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = cli("eval", demo_run["run"], "--labels", tmp_path / "bad.json")
    assert r.exit_code == 2 and "not a COCO ground-truth" in r.output


def test_without_pycocotools_the_message_names_the_extra(demo_run, cli, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocotools", None)  # as if not installed: import fails
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    r = cli("eval", demo_run["run"], "--labels", write_gt(tmp_path, demo_run["truth"], demo_run["run"]))
    assert r.exit_code == 1 and "pip install 'bulkdet[eval]'" in r.output
