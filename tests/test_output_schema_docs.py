"""Every DuckDB / Polars example in docs/output-schema.md runs against a real run folder."""

from __future__ import annotations

import contextlib
import io
import re

import duckdb
import pytest
from conftest import ROOT, make_images

DOC = ROOT / "docs" / "output-schema.md"
BLOCKS = re.findall(r"```(sql|python)\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, analytic_model):
    """A folder holding `run/`, as the examples expect."""
    from bulkdet.ingest.pack import pack
    from bulkdet.run.runner import RunConfig, run

    root = tmp_path_factory.mktemp("docs")
    make_images(root / "src", [(f"img_{i}.jpg", 200 + 40 * i, 150, "jpeg", 1) for i in range(5)])
    (root / "src" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    pack(root / "src", root / "ds", quiet=True)
    run(RunConfig(root / "ds", analytic_model, root / "run", imgsz=160, max_batch=4, quiet=True))
    return root


def test_the_page_has_examples_of_both_kinds():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("sql") >= 5 and kinds.count("python") >= 3


@pytest.mark.parametrize("kind,code", BLOCKS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BLOCKS)])
def test_example_runs(kind, code, run_folder, monkeypatch):
    monkeypatch.chdir(run_folder)
    if kind == "sql":
        rows = duckdb.sql(code).fetchall()
        assert rows or "n_det = 0" in code  # every image here has a rectangle, so that one is empty
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(DOC), "exec"), {})
        assert out.getvalue().strip()
