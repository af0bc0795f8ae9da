"""`bulkdet demo`: the whole chain on synthetic images, checked against their truth."""

import json

import pytest


@pytest.mark.slow
def test_demo_finds_every_rectangle(cli, tmp_path):
    r = cli("demo", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    truth = json.loads((tmp_path / "truth.json").read_text())
    n_rects = sum(len(t["rects"]) for t in truth)
    assert len(truth) == 48 and f"all {n_rects} rectangles found" in r.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "complete"
