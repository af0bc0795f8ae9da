"""The synthetic data the demo, tests and benchmarks share: analytic ONNX detector and images."""

import ast
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from bulkdet.model.info import model_metadata
from bulkdet.synthetic import (
    CLASS_COLORS,
    CLASS_NAMES,
    Rect,
    build_analytic_detector,
    draw_upright,
    make_demo_images,
    random_rects,
    write_image,
)

GRAY = 114 / 255


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_analytic_detector(tmp_path_factory.mktemp("model") / "det.onnx")


@pytest.fixture(scope="module")
def session(model_path):
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def run(session, batch_hwc_uint8_or_float):
    """Run the model on [B,H,W,3] images (uint8 0..255 or float 0..1)."""
    x = np.asarray(batch_hwc_uint8_or_float)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    return session.run(["output0"], {"images": x})[0]


def expected_output(rects):
    """The exact [7, 3] output for one image holding ``rects``."""
    out = np.zeros((7, 3), np.float32)
    for r in rects:
        out[:4, r.class_id] = [(r.x1 + r.x2) / 2, (r.y1 + r.y2) / 2, r.x2 - r.x1, r.y2 - r.y1]
        out[4 + r.class_id, r.class_id] = 1
    return out


def boxes_xyxy(out):
    """{class_id: (x1, y1, x2, y2)} for the anchors with score > 0.5."""
    res = {}
    for c in range(3):
        if out[4 + c, c] > 0.5:
            cx, cy, w, h = out[:4, c]
            res[c] = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    return res


# --------------------------------------------------------------------------
# The ONNX model itself
# --------------------------------------------------------------------------

def test_model_is_valid_with_dynamic_dims_and_metadata(model_path):
    m = onnx.load(str(model_path))
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    inp, = m.graph.input
    out, = m.graph.output
    assert inp.name == "images" and out.name == "output0"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 3, "height", "width"]
    assert out_dims == ["batch", 7, 3]
    meta = model_metadata(m)
    assert ast.literal_eval(meta["names"]) == {0: "red", 1: "green", 2: "blue"}
    assert meta["stride"] == "32" and meta["task"] == "detect"
    assert "analytic" in meta["description"].lower()
    assert CLASS_NAMES == ("red", "green", "blue")
    assert CLASS_COLORS == ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def test_exact_boxes_batch_and_non_square(session):
    h, w = 37, 53  # H != W, neither a multiple of 32
    cases = [
        [Rect(0, 3, 4, 20, 11), Rect(1, 30, 2, 52, 9), Rect(2, 10, 20, 25, 36)],
        [Rect(2, 0, 0, 53, 37)],                      # touches all four borders
        [],                                           # nothing present
        [Rect(1, 52, 36, 53, 37), Rect(0, 0, 0, 1, 1)],  # single pixels in corners
    ]
    batch = np.full((len(cases), h, w, 3), GRAY, np.float32)
    for img, rects in zip(batch, cases):
        for r in rects:
            img[r.y1:r.y2, r.x1:r.x2] = np.array(CLASS_COLORS[r.class_id]) / 255
    out = run(session, batch)
    assert out.shape == (len(cases), 7, 3) and out.dtype == np.float32
    for got, rects in zip(out, cases):
        np.testing.assert_array_equal(got, expected_output(rects))


def test_other_sizes_share_one_session(session):
    # Dynamic H/W: a tall then a wide input through the same session.
    for h, w in [(96, 17), (17, 96)]:
        img = np.full((1, h, w, 3), GRAY, np.float32)
        r = Rect(1, 2, 3, min(w, 15), min(h, 15))
        img[0, r.y1:r.y2, r.x1:r.x2] = (0, 1, 0)
        np.testing.assert_array_equal(run(session, img)[0], expected_output([r]))


def test_gray_padding_and_noise_background_never_fire(session):
    gray = np.full((1, 64, 96, 3), GRAY, np.float32)
    noise = draw_upright(96, 64, [], seed=3)[None]
    # The background really is low-saturation (what write_image promises) ...
    f = noise[0].astype(np.float32) / 255
    for c in range(3):
        others = np.delete(f, c, axis=2).max(axis=2)
        assert (f[..., c] - others).max() < 0.15
    # ... and neither it nor the letterbox gray produces a detection.
    for img in (gray, noise):
        np.testing.assert_array_equal(run(session, img), np.zeros((1, 7, 3), np.float32))


# --------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 64), (64, 2000), (2000, 64), (1920, 1080)])
def test_random_rects_are_valid(size):
    w, h = size
    gap = max(4, int(np.ceil(0.04 * max(w, h))))
    counts = set()
    for seed in range(40):
        rects = random_rects(w, h, 3, np.random.default_rng(seed))
        counts.add(len(rects))
        assert 1 <= len(rects) <= 3
        assert len({r.class_id for r in rects}) == len(rects)
        for r in rects:
            assert r.class_id in (0, 1, 2)
            assert 0 < r.x1 < r.x2 < w and 0 < r.y1 < r.y2 < h
            assert r.x2 - r.x1 >= max(8, 0.1 * w) and r.y2 - r.y1 >= max(8, 0.1 * h)
        for i, a in enumerate(rects):
            for b in rects[i + 1:]:
                apart_x = a.x1 >= b.x2 + gap or b.x1 >= a.x2 + gap
                apart_y = a.y1 >= b.y2 + gap or b.y1 >= a.y2 + gap
                assert apart_x or apart_y, (a, b)
    assert 3 in counts  # these sizes all have room for three
    assert len(random_rects(w, h, 1, np.random.default_rng(0))) == 1


def test_random_rects_is_deterministic():
    a = random_rects(640, 480, 3, np.random.default_rng(7))
    b = random_rects(640, 480, 3, np.random.default_rng(7))
    assert a == b


ORIENTATIONS = range(1, 9)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_write_image_exif_round_trip(tmp_path, session, fmt, orientation):
    w, h = 150, 90
    rects = [Rect(0, 10, 10, 40, 30), Rect(1, 100, 20, 140, 80), Rect(2, 20, 50, 70, 80)]
    p = write_image(tmp_path / f"x.{fmt}", w, h, rects, fmt=fmt, orientation=orientation, seed=5)
    raw = Image.open(p)
    assert raw.format == ("JPEG" if fmt == "jpeg" else "PNG")
    # Stored pixels are rotated for 5..8, and the tag is there to undo it.
    assert raw.size == ((h, w) if orientation >= 5 else (w, h))
    assert raw.getexif().get(0x0112, 1) == orientation
    up = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    assert up.shape == (h, w, 3)
    for r in rects:
        centre = up[(r.y1 + r.y2) // 2, (r.x1 + r.x2) // 2].astype(int)
        assert np.abs(centre - CLASS_COLORS[r.class_id]).max() <= 3
    if fmt == "png":  # lossless: exactly the drawn upright image
        np.testing.assert_array_equal(up, draw_upright(w, h, rects, seed=5))
    got = run(session, up[None])[0]
    assert set(boxes_xyxy(got)) == {0, 1, 2}
    tol = 0 if fmt == "png" else 1
    np.testing.assert_allclose(got, expected_output(rects), atol=tol)


def test_write_image_jpeg_is_444(tmp_path):
    p = write_image(tmp_path / "a.jpg", 64, 64, [Rect(0, 8, 8, 40, 40)], fmt="jpeg")
    assert JpegImagePlugin.get_sampling(Image.open(p)) == 0  # 4:4:4


def letterbox(up, size=640):
    """Keep-aspect bilinear resize onto a gray-114 square, as the pipeline does."""
    h, w = up.shape[:2]
    r = min(size / w, size / h)
    nw, nh = round(w * r), round(h * r)
    canvas = np.full((size, size, 3), 114, np.uint8)
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(
        Image.fromarray(up).resize((nw, nh), Image.BILINEAR))
    return canvas, r, left, top


@pytest.mark.parametrize("size,orientation", [((64, 2000), 6), ((2000, 64), 8),
                                              ((1920, 1080), 3), ((64, 64), 1)])
def test_rects_survive_letterbox_downscale(tmp_path, session, size, orientation):
    # The demo contract: after JPEG, EXIF, a downscale by up to 2000/640 and
    # bilinear blur, each rectangle is still found where it was drawn.
    w, h = size
    for seed in range(3):
        rects = random_rects(w, h, 3, np.random.default_rng(seed))
        p = write_image(tmp_path / f"{seed}.jpg", w, h, rects, orientation=orientation, seed=seed)
        up = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
        img, r, left, top = letterbox(up)
        found = boxes_xyxy(run(session, img[None])[0])
        assert set(found) == {x.class_id for x in rects}
        for x in rects:
            want = (x.x1 * r + left, x.y1 * r + top, x.x2 * r + left, x.y2 * r + top)
            np.testing.assert_allclose(found[x.class_id], want, atol=1.5)


def test_make_demo_images(tmp_path):
    truth = make_demo_images(tmp_path / "a", n=12, seed=1)
    assert len(truth) == 12
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    assert any("/" in t["path"] for t in truth)  # some in sub-folders
    sizes = {(t["width"], t["height"]) for t in truth}
    assert {(64, 64), (64, 2000), (2000, 64)} <= sizes
    seen = set()
    for t in truth:
        p = tmp_path / "a" / t["path"]
        raw = Image.open(p)
        seen.add((raw.format, raw.getexif().get(0x0112, 1)))
        up = ImageOps.exif_transpose(raw)
        assert up.size == (t["width"], t["height"])
        assert 1 <= len(t["rects"]) <= 3
        for c, x1, y1, x2, y2 in t["rects"]:
            centre = np.asarray(up.convert("RGB"))[(y1 + y2) // 2, (x1 + x2) // 2]
            assert np.abs(centre.astype(int) - CLASS_COLORS[c]).max() <= 3
    assert seen == {(f, o) for f in ("JPEG", "PNG") for o in (1, 3, 6, 8)}
    # Deterministic: same seed, same truth and the same bytes.
    again = make_demo_images(tmp_path / "b", n=12, seed=1)
    assert again == truth
    for t in truth:
        assert (tmp_path / "a" / t["path"]).read_bytes() == (tmp_path / "b" / t["path"]).read_bytes()
