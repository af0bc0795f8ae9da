"""`bulkdet demo`: the whole chain on synthetic images, checked against their known truth."""

from __future__ import annotations

from pathlib import Path

from bulkdet.ingest.pack import pack
from bulkdet.results.report import print_report
from bulkdet.run.runner import RunConfig, run
from bulkdet.store.parts import read_detections
from bulkdet.synthetic import build_analytic_detector, compare_with_truth, make_demo_images

N_IMAGES = 48


def run_demo(out: Path, echo=print) -> list[str]:
    """Make images and the analytic detector in `out`, then pack, run, report and check the
    detections against the truth. Returns the problems found (none: the demo passed)."""
    out = Path(out)
    truth = make_demo_images(out / "images", n=N_IMAGES, truth_path=out / "truth.json")
    model = build_analytic_detector(out / "analytic-rgb.onnx")
    echo(f"demo: {len(truth)} synthetic images and an analytic red/green/blue rectangle detector in {out}")
    pack(out / "images", out / "dataset")
    run(RunConfig(dataset=out / "dataset", model=model, out=out / "run", overwrite=True))
    print_report(out / "run")
    problems = compare_with_truth(truth, read_detections(out / "run").to_pylist())
    if problems:
        echo(f"demo: {len(problems)} problem(s) against the known truth:\n  " + "\n  ".join(problems[:20]))
    else:
        n_rects = sum(len(t["rects"]) for t in truth)
        echo(f"demo: all {n_rects} rectangles found with the right class and corners within tolerance, "
             f"no extra boxes. Results: {out / 'run'}")
    return problems
