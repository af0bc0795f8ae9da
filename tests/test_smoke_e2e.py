from conftest import make_images


def test_pack_run_report_smoke(tmp_path, analytic_model, cli):
    make_images(tmp_path / "src", [("a.jpg", 320, 240, "jpeg", 1), ("b.png", 100, 300, "png", 6)])
    assert cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "-q").exit_code == 0
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    r = cli("report", tmp_path / "run")
    assert r.exit_code == 0 and "images: 2" in r.output
