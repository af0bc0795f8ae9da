"""`make gpu-check` (benchmarks/gpu_check.py): its CPU dry run end to end, and the guards that keep
one failing section from losing the others' figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from benchmarks import gpu_check


@pytest.mark.slow
def test_dry_run_writes_every_figure_and_leaves_the_gpu_ones_null(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--model", "analytic",
                        "--data", str(tmp_path / "data")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "GPU figures were NOT measured" in r.stdout
    (path,) = out.glob("gpu-check-*.json")  # $OUT, one file
    res = json.loads(path.read_text())
    assert res["gpu_measured"] is False and res["device"].startswith("cpu")
    for key in gpu_check.HEADLINE:
        assert key in res and res[key] is None, key
    dry = res["cpu_dry_run"]
    assert all(dry[k] > 0 for k in gpu_check.HEADLINE), dry
    assert dry["efficiency"] < 3  # end to end cannot beat the model alone by much (noise only)
    assert res["errors"] == {}
    sizes = gpu_check.CPU_SIZES
    assert res["decode_only"]["1080p"]["cpu"]["images"] >= sizes.hd
    assert res["decode_only"]["small"]["cpu"]["images"] >= sizes.small
    for precision in ("fp32", "fp16"):
        assert res["model_only"][precision]["images"] >= sizes.mix
    assert res["model_only"]["fp16"]["input_dtype"] == "float16"
    for run in res["end_to_end"].values():
        assert run["complete"] and run["images"] == sizes.mix * sizes.copies and run["failed"] == 0
    assert res["naive"]["images"] >= 1
    parity = res["parity"]
    assert parity["passed"] and parity["cpu_boxes"] >= sizes.demo and not parity["cpu_truth_problems"]
    tiles = res["tiles"]  # --tile 640: every square at a seam or a corner found once, exactly
    assert tiles["parity"]["passed"] and tiles["parity"]["cpu"]["found"] == 3 * sizes.tiled
    assert tiles["fp32"]["complete"] and tiles["fp32"]["images"] == sizes.tiled and tiles["fp32"]["tiles_per_s"] > 0
    tests = res["pytest_gpu"]
    assert tests["files"] and tests["failed"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] >= 1


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    result = {"errors": {}, "notes": {}, "section_s": {}}
    check = gpu_check.Check(result, tmp_path / "r.json", budget_s=60)
    assert check.section(("a",), lambda: 1 / 0, 10) is None
    assert check.section(("b", "c"), lambda: {"images_per_s": 5.0}, 10) == {"images_per_s": 5.0}
    saved = json.loads((tmp_path / "r.json").read_text())  # saved after every section
    assert saved["b"]["c"] == {"images_per_s": 5.0}
    assert saved["errors"]["a"].startswith("ZeroDivisionError")
    assert set(saved["section_s"]) == {"a", "b.c"}


def test_a_section_over_its_limit_stops_and_one_past_the_budget_is_skipped(tmp_path):
    result = {"errors": {}, "notes": {}, "section_s": {}}
    check = gpu_check.Check(result, tmp_path / "r.json", budget_s=5)
    t0 = time.monotonic()
    check.section(("slow",), lambda: time.sleep(30), 0.3)
    assert time.monotonic() - t0 < 5 and "over its" in result["errors"]["slow"]
    check.deadline = time.monotonic()  # budget spent
    assert check.section(("late",), lambda: 1, 10) is None
    assert "budget" in result["errors"]["late"]


def test_an_inner_time_limit_fires_first_and_the_outer_one_resumes():
    with pytest.raises(gpu_check.TimeLimit) as outer:
        with gpu_check.time_limit(0.6, "outer"):
            t0 = time.monotonic()
            with pytest.raises(gpu_check.TimeLimit) as inner:
                with gpu_check.time_limit(0.2, "inner"):
                    time.sleep(5)
            assert inner.value.args[0] == "inner" and time.monotonic() - t0 < 0.5
            time.sleep(5)
    assert outer.value.args[0] == "outer" and time.monotonic() - t0 < 1.5


def test_gpu_tests_are_found_by_their_mark():
    files = gpu_check.gpu_test_files()
    assert "tests/test_gpu.py" in files and "tests/test_gpu_check.py" not in files
