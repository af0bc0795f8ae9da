"""Hostile inputs: every file ends as exactly one row with a status; the run goes on (exit 3).

The expected behaviour of each input is the table in docs/reliability.md (and in
hostile_corpus.py, which writes the corpus).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter

import duckdb
import numpy as np
import pytest
from PIL import Image

from bulkdet.run.decode import Decoder, decode_isolating, pillow_letterbox
from bulkdet.synthetic import compare_with_truth, draw_upright, random_rects, write_image
from bulkdet.ingest.imageinfo import sniff
from bulkdet.run.plan import Batch, letterbox
from bulkdet.store.parts import read_detections, read_images
from bulkdet.store.manifest import processed, read_manifest
from bulkdet.store.shards import shard_keys, shard_path
from conftest import ROOT, make_images
from hostile_corpus import build_hostile_corpus, png16_bytes, write_bomb_png

IMGSZ = 256


def _make_unreadable(src):
    """A file and a folder without read permission. Root reads them anyway (permission bits do
    not bind root), so what we expect depends on who runs the tests; the EIO link in the corpus
    (followed in test_follow_symlinks) covers a read that fails for everyone."""
    (src / "locked").mkdir()
    for i, path in enumerate((src / "locked" / "inside.jpg", src / "unreadable.jpg")):
        Image.fromarray(draw_upright(100, 100, random_rects(100, 100, 2, i), seed=i)).save(path, quality=95)
    os.chmod(src / "unreadable.jpg", 0)
    os.chmod(src / "locked", 0)
    try:
        open(src / "unreadable.jpg", "rb").close()
        os.listdir(src / "locked")
    except PermissionError:
        return {"unreadable.jpg": "read_error", "locked": "read_error"}
    return {"unreadable.jpg": "ok", "locked/inside.jpg": "ok"}  # running as root


def _restore_permissions(src):
    os.chmod(src / "locked", 0o755)
    os.chmod(src / "unreadable.jpg", 0o644)


def test_hostile_corpus_packs_and_runs_to_exit_3_with_every_file_once(tmp_path, analytic_model, cli):
    src = tmp_path / "src"
    expected, truth = build_hostile_corpus(src)
    expected.update(_make_unreadable(src))
    try:
        r = cli("pack", src, "--out", tmp_path / "ds", "-q")
    finally:
        _restore_permissions(src)
    assert r.exit_code == 0, r.output
    manifest = read_manifest(tmp_path / "ds")
    assert Counter(manifest.column("path").to_pylist()) == Counter(expected.keys())  # each file once

    # Small batches: the truncated JPEG shares its batch with good images.
    r = cli("run", tmp_path / "ds", "--model", analytic_model, "--out", tmp_path / "run",
            "--imgsz", IMGSZ, "--max-batch", 8, "-q")
    n_failed = sum(status != "ok" for status in expected.values())
    assert r.exit_code == 3, r.output
    assert f"{n_failed} input(s) failed" in r.output
    assert "1 image(s) decoded by the CPU fallback" in r.output  # the GIF

    images = read_images(tmp_path / "run")
    assert Counter(images.column("path").to_pylist()) == Counter(expected.keys())  # one row per file
    assert sorted(images.column("image_id").to_pylist()) == sorted(manifest.column("image_id").to_pylist())
    rows = {row["path"]: row for row in images.to_pylist()}
    assert {p: row["status"] for p, row in rows.items()} == expected
    for path, row in rows.items():
        assert (row["error"] is None) == (row["status"] == "ok"), (path, row["error"])
    assert "truncated" in rows["bad/truncated.jpg"]["error"]
    assert rows["bad/garbage_after_1kb.jpg"]["error"].startswith("corrupt")
    assert "exceeds --max-pixels" in rows["bad/bomb_20000x20000.png"]["error"]

    # Every image that decodes has its rectangles found, whatever its format or name.
    dets = read_detections(tmp_path / "run").to_pylist()
    truth_paths = {t["path"] for t in truth}
    problems = compare_with_truth(truth, [d for d in dets if d["path"] in truth_paths], imgsz=IMGSZ)
    assert not problems, problems
    (one_pixel,) = [d for d in dets if d["path"] == "formats/one_pixel.png"]
    assert one_pixel["class_name"] == "red"
    assert np.allclose([one_pixel[k] for k in ("x1", "y1", "x2", "y2")], [0, 0, 1, 1], atol=0.05)

    # The same bytes under three paths (a copy, a link): stored once, every row there, same key.
    keys = dict(zip(manifest.column("path").to_pylist(), manifest.column("key").to_pylist()))
    assert keys["good/a.jpg"] == keys["good/dup_of_a.jpg"] == keys["links/to_good.jpg"]
    stored = shard_keys(shard_path(tmp_path / "ds" / "shards", 0))
    stored_keys = processed(manifest).column("key").to_pylist()  # ok and corrupt: bytes stored
    assert stored == set(stored_keys) and len(stored) == len(stored_keys) - 2

    # The printed query lists exactly the failed inputs.
    query = r.output.split('duckdb -c "', 1)[1].rsplit('"', 1)[0]
    assert len(duckdb.sql(query).fetchall()) == n_failed


def test_follow_symlinks_resolves_links_and_detects_loops(tmp_path, cli):
    src = tmp_path / "src"
    expected, _ = build_hostile_corpus(src)
    r = cli("pack", src, "--out", tmp_path / "ds", "--follow-symlinks", "-q")
    assert r.exit_code == 0, r.output
    manifest = read_manifest(tmp_path / "ds").to_pylist()
    assert Counter(row["path"] for row in manifest) == Counter(expected.keys())  # links/loop: no row
    rows = {row["path"]: row for row in manifest}
    # decode_error only shows at run time; at pack such a file (a truncated one) is corrupt.
    assert {p: row["status"] for p, row in rows.items()} == {
        p: "corrupt" if s == "decode_error" else s for p, s in expected.items()}
    assert "dangling" in rows["links/dangling.jpg"]["error"]
    assert "Too many levels of symbolic links" in rows["links/self"]["error"]
    assert "Input/output error" in rows["links/io_error.jpg"]["error"]
    assert rows["links/to_good.jpg"]["key"] == rows["good/a.jpg"]["key"]


def test_max_pixels_marks_large_images_too_large(tmp_path, cli):
    make_images(tmp_path / "src", [("small.png", 50, 40, "png", 1), ("big.jpg", 200, 100, "jpeg", 1)])
    r = cli("pack", tmp_path / "src", "--out", tmp_path / "ds", "--max-pixels", 10_000, "-q")
    assert r.exit_code == 0, r.output
    status = dict(zip(*read_manifest(tmp_path / "ds").select(["path", "status"]).to_pydict().values()))
    assert status == {"small.png": "ok", "big.jpg": "too_large"}


def test_decompression_bomb_is_never_decoded(tmp_path):
    """A 20000x20000 PNG (400 Mpx, ~50 KB): `too_large` from its header; the pack process
    never allocates its pixels (they would take at least 400 MB)."""
    (tmp_path / "src").mkdir()
    bomb = write_bomb_png(tmp_path / "src" / "bomb.png")
    assert bomb.stat().st_size < 100_000
    # The peak memory of a fresh process (VmHWM starts at exec; a child's ru_maxrss would
    # include the forked test process).
    code = ("import sys; from bulkdet.ingest.pack import pack; pack(sys.argv[1], sys.argv[2], quiet=True); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code, tmp_path / "src", tmp_path / "ds"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    (row,) = read_manifest(tmp_path / "ds").to_pylist()
    assert row["status"] == "too_large" and row["shard"] == -1
    peak_mb = int(r.stdout.split()[1]) / 1024  # "VmHWM:  123456 kB"
    assert peak_mb < 300, f"pack peaked at {peak_mb:.0f} MB: the bomb was decoded"


# --- the decoder on its own: bisection and the CPU fallback ---------------------------------

def _batch(sizes, input_hw=(96, 96)) -> Batch:
    w = np.array([s[0] for s in sizes], np.int32)
    h = np.array([s[1] for s in sizes], np.int32)
    n = len(sizes)
    return Batch(0, 0, np.arange(n, dtype=np.int64), [f"{i}" for i in range(n)], [b""] * n, w, h,
                 input_hw, letterbox(w, h, *input_hw))


def _jpeg(rgb, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _good_batch(n: int = 12):
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(40, 120)), int(rng.integers(40, 120))) for _ in range(n)]
    return sizes, [_jpeg(draw_upright(w, h, random_rects(w, h, 2, rng), seed=i)) for i, (w, h) in enumerate(sizes)]


def _counting(decoder: Decoder) -> list[int]:
    """Sizes of the DALI runs the decoder makes from now on."""
    runs = []
    real_run = decoder._run
    decoder._run = lambda enc, batch, idx: runs.append(len(idx)) or real_run(enc, batch, idx)
    return runs


def _gif(size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(draw_upright(*size, random_rects(*size, 2, 9), seed=9)).quantize(256).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "gif"])
def test_bad_image_in_a_batch_costs_only_its_own_row(damage):
    sizes, encoded = _good_batch()
    bad = 7
    hostile = list(encoded)
    hostile[bad] = {"truncated": encoded[bad][: len(encoded[bad]) // 2], "not_an_image": b"plain text " * 50,
                    "gif": _gif(sizes[bad])}[damage]
    decoder = Decoder("cpu", max_batch=16, num_threads=1)
    clean = np.asarray(decoder.decode(_batch(sizes), encoded).tensor)

    runs = _counting(decoder)
    out = decoder.decode(_batch(sizes), hostile)
    good = [i for i in range(len(sizes)) if i != bad]
    assert np.array_equal(np.asarray(out.tensor)[good], clean[good])  # the same pixels as without it
    if damage == "gif":  # DALI's parser does not read GIF: straight to the CPU fallback
        assert out.errors == {} and out.fallback == [bad] and runs == [11]
        return
    assert set(out.errors) == {bad} and out.fallback == []
    assert out.errors[bad].startswith("dali: ") and "pillow: " in out.errors[bad]
    if damage == "truncated":  # DALI names the sample: the other 11 decode again in one run
        assert "image file is truncated" in out.errors[bad]
        assert runs == [12, 11]
    else:  # DALI's parser rejects it up front: it never enters a DALI batch (where a parse
        # failure can crash the process, see docs/reliability.md)
        assert "nvImageCodec can't parse it" in out.errors[bad]
        assert runs == [11]
    # The pipeline still works after the errors.
    assert np.array_equal(np.asarray(decoder.decode(_batch(sizes), encoded).tensor), clean)


def test_a_failure_dali_does_not_attribute_is_bisected():
    """When DALI's error names no sample, halves are decoded until the bad image is alone."""
    sizes, encoded = _good_batch()
    bad = 9
    hostile = list(encoded)
    hostile[bad] = encoded[bad][: len(encoded[bad]) // 2]
    decoder = Decoder("cpu", max_batch=16, num_threads=1)
    clean = np.asarray(decoder.decode(_batch(sizes), encoded).tensor)
    runs = _counting(decoder)
    tensor = np.zeros_like(clean)
    errors: dict[int, str] = {}
    batch = _batch(sizes)

    def decode_group(group):
        tensor[group] = np.asarray(decoder._run(hostile, batch, group))
    decode_isolating(decode_group, list(range(12)), errors, decoder._rebuild, RuntimeError("no sample named"))
    assert set(errors) == {bad}
    good = [i for i in range(12) if i != bad]
    assert np.array_equal(tensor[good], clean[good])
    assert runs[:2] == [6, 6] and len(runs) <= 2 * int(np.ceil(np.log2(12))), runs


def test_cpu_fallback_matches_dali_geometry_and_orientation(tmp_path):
    """The Pillow fallback lands each image where DALI does: same letterbox, EXIF applied,
    16-bit scaled; so boxes from fallback-decoded images map back the same way."""
    rng = np.random.default_rng(2)
    rgb = draw_upright(90, 60, random_rects(90, 60, 3, rng), seed=3)
    write_image(tmp_path / "rotated.jpg", 60, 90, random_rects(60, 90, 2, rng), orientation=6, seed=4)
    gray16 = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257).save(gray16, format="PNG")
    samples = [_jpeg(rgb, subsampling=0), (tmp_path / "rotated.jpg").read_bytes(), png16_bytes(rgb),
               gray16.getvalue()]
    sizes = [(sniff(s).width, sniff(s).height) for s in samples]
    assert sizes[1] == (60, 90)  # upright size of the EXIF-rotated file
    batch = _batch(sizes)
    dali = np.asarray(Decoder("cpu", max_batch=4, num_threads=1).decode(batch, samples).tensor)
    for i, data in enumerate(samples):
        diff = np.abs(pillow_letterbox(data, batch, i) - dali[i])
        assert diff.mean() < 0.01, (i, diff.mean())  # only resampling differences


def test_fallback_decodes_first_frame_of_animated_gif():
    rng = np.random.default_rng(5)
    frames = [draw_upright(80, 64, random_rects(80, 64, 3, rng), seed=s) for s in (1, 2)]
    pal = [Image.fromarray(f).quantize(256, dither=Image.Dither.NONE) for f in frames]
    buf = io.BytesIO()
    pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:], duration=50)
    batch = _batch([(80, 64)], input_hw=(80, 80))
    out = Decoder("cpu", max_batch=2, num_threads=1).decode(batch, [buf.getvalue()])
    assert out.errors == {} and out.fallback == [0]
    expected = [pillow_letterbox(_png(np.asarray(p.convert("RGB"))), batch, 0) for p in pal]
    tensor = np.asarray(out.tensor)[0]
    assert np.abs(tensor - expected[0]).max() < 1e-6
    assert np.abs(tensor - expected[1]).mean() > 0.01  # not the second frame


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "pillow: UnidentifiedImageError"),
    (b"GIF89a" + b"\x00" * 40, "pillow:"),
])
def test_undecodable_bytes_get_both_decoders_messages(data, message):
    batch = _batch([(32, 32), (32, 32)], input_hw=(32, 32))
    good = _jpeg(np.full((32, 32, 3), 90, np.uint8))
    out = Decoder("cpu", max_batch=2, num_threads=1).decode(batch, [good, data])
    assert set(out.errors) == {1}
    assert out.errors[1].startswith("dali: ") and message in out.errors[1]
    assert "0x" not in out.errors[1]  # no object addresses: a re-run gives the same row
    assert np.allclose(np.asarray(out.tensor)[1], 114 / 255)  # a failed image is gray padding
