"""`bulkdet report --html`: one self-contained page, rendered in headless Chromium.

The page is opened in Chromium with every network name unresolvable and a dead proxy, so
anything that needed the network would fail to load. A copy of the page with a small
checking script added reports, after load, each plot's rendered size and element count and
each sample's decoded size; a screenshot of the page itself is kept in tests/artifacts/.
"""

from __future__ import annotations

import base64
import html
import errno
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_images
from PIL import Image

from bulkdet.synthetic import Rect, write_image
from bulkdet.results.html_report import PALETTE, draw_sample, write_html
from bulkdet.store.atomic import temporary_path
from bulkdet.store.parts import read_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "tests" / "artifacts"
WINDOW = (1280, 2600)
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const r = {plots: [], images: []};
  for (const s of document.querySelectorAll('figure.plot svg')) {
    const b = s.getBoundingClientRect();
    r.plots.push({width: b.width, height: b.height, paths: s.querySelectorAll('path').length,
                  texts: s.querySelectorAll('text').length});
  }
  for (const i of document.querySelectorAll('img')) {
    r.images.push({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight});
  }
  const pre = document.createElement('pre');
  pre.id = 'bulkdet-check';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory, analytic_model):
    from bulkdet.ingest.pack import pack
    from bulkdet.run.runner import RunConfig, run

    root = tmp_path_factory.mktemp("html")
    specs = [(f"img_{i:02d}.{'jpg' if i % 2 else 'png'}", 120 + 53 * i, 90 + 37 * (i % 4),
              "jpeg" if i % 2 else "png", (1, 6, 3, 8)[i % 4]) for i in range(10)]
    make_images(root / "src", specs)
    (root / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pack(root / "src", root / "ds", quiet=True)
    run(RunConfig(root / "ds", analytic_model, root / "run", imgsz=160, max_batch=3, quiet=True))
    return root


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--proxy-server=127.0.0.1:9",
           "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)]


def test_html_is_one_self_contained_file(report, cli, tmp_path):
    out = tmp_path / "report.html"
    r = cli("report", report / "run", "--html", out)
    assert r.exit_code == 0 and str(out) in r.output
    page = out.read_text()
    # Nothing fetched from anywhere: no external src/href, stylesheet link or script.
    assert not re.findall(r'(?:src|href)\s*=\s*["\'](?!data:|#)', page)
    assert "<link" not in page and "<script" not in page
    assert page.count('<figure class="plot"><svg') == 5  # throughput, stages, batch sizes, classes, scores
    samples = _data_uris(page)
    with_dets = [r for r in read_images(report / "run").to_pylist() if r["n_det"]]
    assert len(samples) == min(6, len(with_dets))
    for data in samples:
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.width > 0 and img.height > 0
    assert "broken.png" in page  # the failures table
    assert "Throughput over time" in page and "Busy share" in page and "Score distribution" in page


@pytest.mark.slow
def test_html_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    out = write_html(report / "run", tmp_path / "report.html")
    page = out.read_text()
    checked = tmp_path / "check.html"
    checked.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    r = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="bulkdet-check">(.*?)</pre>', r.stdout, re.S)
    assert found, f"no check result in the DOM: {r.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    assert len(result["plots"]) == 5
    for plot in result["plots"]:
        assert plot["width"] > 300 and plot["height"] > 100, plot
        assert plot["paths"] >= 5 and plot["texts"] >= 5, plot
    assert len(result["images"]) == len(_data_uris(page)) > 0
    for img in result["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img

    shot = tmp_path / "report.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", out.as_uri())
    assert shot.exists(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == WINDOW
    # Not a blank page: plots and photos give many distinct colours.
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 200
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    print(f"screenshot: {ARTIFACTS / 'report.png'}")


def test_sample_boxes_are_drawn_on_the_upright_image(tmp_path):
    # 300x200 upright, stored rotated (EXIF orientation 6); a red rectangle at a known place.
    rect = Rect(0, 60, 80, 160, 150)
    path = write_image(tmp_path / "rotated.jpg", 300, 200, [rect], fmt="jpeg", orientation=6)
    box = {"class_id": 0, "class_name": "red", "score": 0.9, "x1": 60.0, "y1": 80.0, "x2": 160.0, "y2": 150.0}
    uri = draw_sample(path.read_bytes(), [box])
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)
    scale = 480 / 300
    assert img.shape == (round(200 * scale), 480, 3)
    outline = np.array([int(PALETTE[0][i:i + 2], 16) for i in (1, 3, 5)])
    mid_y = round(115 * scale)
    assert np.abs(img[mid_y, round(60 * scale)] - outline).max() < 40  # the box's left edge
    assert np.abs(img[mid_y, round(110 * scale)] - [255, 0, 0]).max() < 40  # the red rectangle inside it


def test_html_without_the_dataset_says_why_there_are_no_samples(report, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(report / "run", moved)
    run_json = json.loads((moved / "run.json").read_text())
    run_json["dataset"] = str(tmp_path / "gone")
    run_json["config"]["dataset"] = str(tmp_path / "gone")
    (moved / "run.json").write_text(json.dumps(run_json))
    page = write_html(moved, tmp_path / "r.html").read_text()
    assert "Samples not shown" in page and "gone" in page
    assert page.count('<figure class="plot"><svg') == 5


def test_a_page_that_cannot_be_written_leaves_the_previous_one_whole(report, tmp_path):
    page = tmp_path / "report.html"
    page.write_text("the previous page")
    tmp = temporary_path(page, per_process=True)
    os.symlink("/dev/full", tmp)  # writes there fail with ENOSPC
    with pytest.raises(OSError) as info:
        write_html(report / "run", page)
    assert info.value.errno == errno.ENOSPC
    assert page.read_text() == "the previous page" and not os.path.lexists(tmp)
