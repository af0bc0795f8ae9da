"""The model input's normalisation (--input-scale, --mean, --std, --channels, or the model's metadata):
applied in DALI's one normalise pass, the Pillow fallback, the tiles path and the letterbox gray alike.

The end-to-end models are the analytic detector behind a prefix that undoes a normalisation
(x * std + mean, then / scale; a BGR one then swaps the channels back to RGB): it finds the exact
boxes only when bulkdet feeds it that one.
"""

import io
import json

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper
from PIL import Image

from bulkdet.choices import Channels
from bulkdet.ingest.pack import pack
from bulkdet.model.info import IMAGENET_MEAN, IMAGENET_STD, InputNorm, parse_norm
from bulkdet.run.decode import Decoder, _to_host, pad_values, pillow_letterbox
from bulkdet.run.plan import Batch, letterbox
from bulkdet.synthetic import Rect, compare_with_truth, draw_upright, write_image
from conftest import make_images

IMAGENET = InputNorm(1, IMAGENET_MEAN, IMAGENET_STD)
MMDET = InputNorm(255, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))  # mmdetection's config numbers
YOLOX = InputNorm(255)  # legacy YOLOX: 0..255, no mean/std
BGR = InputNorm(channels=Channels.BGR)
YOLOX_BGR = InputNorm(255, channels=Channels.BGR)  # YOLOX since 0.2: BGR 0..255
# mmdetection's numbers for a model trained on BGR (to_rgb=False): its config writes them B,G,R
MMDET_BGR = InputNorm(255, MMDET.mean[::-1], MMDET.std[::-1], Channels.BGR)
NORMS = {"imagenet": IMAGENET, "mmdet": MMDET, "yolox": YOLOX}
OPTIONS = {"imagenet": ["--mean", "imagenet", "--std", "imagenet"],
           "mmdet": ["--input-scale", "255", "--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375"],
           "yolox": ["--input-scale", "255"]}


def undo(tensor, norm: InputNorm) -> np.ndarray:
    """A normalised input back in 0..1 (what the default normalisation gives)."""
    ndim = np.ndim(tensor)  # [3], [3, H, W] or [B, 3, H, W]
    shape = (1, 3, 1, 1) if ndim == 4 else (3,) + (1,) * (ndim - 1)
    x = np.asarray(tensor, np.float64) * np.reshape(norm.std, shape) + np.reshape(norm.mean, shape)
    return x / norm.scale


# ------------------------------------------------------------------------------ parsing


def test_parse_norm_forms():
    assert parse_norm() == InputNorm() and InputNorm().is_default
    assert parse_norm(None, "imagenet", "imagenet") == IMAGENET
    assert parse_norm("255", "imagenet", "ImageNet") == InputNorm(255, tuple(v * 255 for v in IMAGENET_MEAN),
                                                                  tuple(v * 255 for v in IMAGENET_STD))
    assert parse_norm(1, "0.5", "0.5") == InputNorm(1, (0.5,) * 3, (0.5,) * 3)  # one value for all channels
    assert parse_norm(255, "[123.675, 116.28, 103.53]", "58.395 57.12 57.375") == MMDET
    # on 8-bit pixels (DALI's mean/std): the same thing
    for norm in (MMDET, IMAGENET):
        mean, std = norm.on_bytes()
        np.testing.assert_allclose(mean, MMDET.mean)
        np.testing.assert_allclose(std, MMDET.std)
    assert YOLOX.on_bytes() == ([0.0] * 3, [1.0] * 3) and InputNorm().on_bytes() == ([0.0] * 3, [255.0] * 3)


@pytest.mark.parametrize("scale,mean,std,message", [
    ("3", None, None, "input scale '3' is not 1"),
    (1, "123.675,116.28,103.53", None, "not within 0..1 (the pixel range of input scale 1): give it in those "
                                       "units, or input scale 255"),
    (255, "300", None, "not within 0..255"),
    (1, None, "0", "std 0 is not above 0"),
    (1, None, "-0.2,0.2,0.2", "std -0.2,0.2,0.2 is not above 0"),
    (1, "a,b,c", None, "mean 'a,b,c' is not 3 numbers"),
    (1, "0.1,0.2", None, "is not 3 numbers"),
    (1, "nan", None, "is not 3 numbers"),
    (1, "imagenett", None, "or imagenet"),
])
def test_parse_norm_refuses_with_the_value_and_its_range(scale, mean, std, message):
    with pytest.raises(ValueError) as exc:
        parse_norm(scale, mean, std)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------ decoding


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _gif(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_decode_path_normalises_alike_gray_padding_included(name):
    """DALI (whole images), the Pillow fallback (a GIF DALI rejects), a failed image's row, and
    tiles: undoing the normalisation gives what the default 0..1 decode gives, padding included."""
    norm = NORMS[name]
    images = [draw_upright(w, h, [Rect(0, 5, 5, 20, 20)], seed=s) for s, (w, h) in enumerate([(90, 40), (40, 70)])]
    encoded = [_png(images[0]), _gif(images[1]), b"not an image"]
    sizes = [(90, 40), (40, 70), (50, 50)]  # padded above and below, left and right, all gray
    w = np.array([s[0] for s in sizes], np.int32)
    h = np.array([s[1] for s in sizes], np.int32)
    batch = Batch(0, 0, np.arange(3), [""] * 3, [b""] * 3, w, h, (64, 96), letterbox(w, h, 64, 96))
    plain = Decoder("cpu", max_batch=4, num_threads=1).decode(batch, encoded)
    out = Decoder("cpu", max_batch=4, num_threads=1, norm=norm).decode(batch, encoded)
    assert out.fallback == plain.fallback == [1] and set(out.errors) == set(plain.errors) == {2}
    np.testing.assert_allclose(undo(out.tensor, norm), plain.tensor, atol=1e-5)
    assert not np.allclose(out.tensor, plain.tensor, atol=0.01)  # it did normalise
    for i in (0, 1):  # the gray of DALI's letterbox and of the fallback's, normalised
        np.testing.assert_allclose(out.tensor[i, :, 0, 0], pad_values(norm), rtol=1e-6)
    np.testing.assert_allclose(undo(pad_values(norm), norm), [114 / 255] * 3, atol=1e-6)
    np.testing.assert_allclose(out.tensor[2], np.broadcast_to(pad_values(norm)[:, None, None], (3, 64, 96)))
    np.testing.assert_allclose(undo(pillow_letterbox(encoded[0], batch, 0, norm=norm), norm),
                               pillow_letterbox(encoded[0], batch, 0), atol=1e-5)


@pytest.mark.parametrize("name", ["imagenet", "yolox"])
def test_tiles_are_normalised_as_images(tmp_path, name):
    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand

    norm = NORMS[name]
    data = write_image(tmp_path / "a.png", 600, 300, [Rect(1, 100, 50, 200, 120)], fmt="png", seed=1).read_bytes()
    rows = pa.table({"image_id": [0], "shard": [0], "width": [600], "height": [300], "path": ["a"], "key": [b"a"]})
    for batch in plan(expand(rows, TileSettings(256, overlap=0.25, full=True)), 256, 4):
        plain = Decoder("cpu", max_batch=4, num_threads=1).decode(batch, [data] * len(batch))
        out = Decoder("cpu", max_batch=4, num_threads=1, norm=norm).decode(batch, [data] * len(batch))
        assert out.errors == {}
        np.testing.assert_allclose(undo(out.tensor, norm), plain.tensor, atol=1e-5)


# ------------------------------------------------------------------------------ end to end


def unnormalising_detector(src, dst, norm: InputNorm, metadata: bool = False):
    """The analytic detector that expects inputs normalised by `norm`: it undoes it first (a BGR
    input: then a Gather on the channel axis puts it back in RGB)."""
    model = onnx.load(str(src))
    g = model.graph
    for node in g.node:
        node.input[:] = ["px" if i == "images" else i for i in node.input]
    F = TensorProto.FLOAT
    g.initializer.extend([
        helper.make_tensor("un_std", F, [1, 3, 1, 1], list(norm.std)),
        helper.make_tensor("un_mean", F, [1, 3, 1, 1], list(norm.mean)),
        helper.make_tensor("un_scale", F, [], [float(norm.scale)]),
    ])
    prefix = [helper.make_node("Mul", ["images", "un_std"], ["un_x"]),
              helper.make_node("Add", ["un_x", "un_mean"], ["un_y"]),
              helper.make_node("Div", ["un_y", "un_scale"], ["un_px" if norm.bgr else "px"])]
    if norm.bgr:
        g.initializer.append(helper.make_tensor("to_rgb", TensorProto.INT64, [3], [2, 1, 0]))
        prefix.append(helper.make_node("Gather", ["un_px", "to_rgb"], ["px"], axis=1))
    nodes = prefix + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    if metadata:
        meta = {p.key: p.value for p in model.metadata_props}
        meta.update({"input_scale": str(norm.scale), "mean": json.dumps(list(norm.mean)),
                     "std": ",".join(map(str, norm.std)), **({"channels": "BGR"} if norm.bgr else {})})
        helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm")
    specs = [("a.jpg", 640, 480, "jpeg", 6), ("b.png", 300, 900, "png", 1), ("c.jpg", 1500, 200, "jpeg", 3),
             ("d.png", 333, 500, "png", 1)]
    truth = make_images(root / "src", specs, seed=11)
    pack(root / "src", root / "ds", quiet=True)
    return root / "ds", truth


def _run(cli, dataset, model, out, *extra):
    r = cli("run", dataset, "--model", model, "--out", out, "-q", *extra)
    rows = pq.read_table(out / "detections").to_pylist() if r.exit_code == 0 else None
    return r, rows


def _error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


@pytest.mark.parametrize("name", sorted(NORMS))
def test_exact_boxes_only_with_the_models_normalisation(tmp_path, analytic_model, cli, dataset, name):
    ds, truth = dataset
    model = unnormalising_detector(analytic_model, tmp_path / f"{name}.onnx", NORMS[name])
    r, rows = _run(cli, ds, model, tmp_path / "plain")  # fed 0..1: the colours it looks for are not there
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) != []
    r, rows = _run(cli, ds, model, tmp_path / "right", *OPTIONS[name])
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) == []
    run = json.loads((tmp_path / "right" / "run.json").read_text())
    assert run["model"]["input_norm"] == NORMS[name].as_dict()
    # A resumed run with another normalisation is refused like any other change of settings.
    other = OPTIONS["yolox" if name != "yolox" else "imagenet"]
    r, _ = _run(cli, ds, model, tmp_path / "right", *other)
    assert r.exit_code == 2 and "input_norm" in _error_line(r) and "--overwrite" in _error_line(r)
    r, _ = _run(cli, ds, model, tmp_path / "right")  # none given: the default, another normalisation too
    assert r.exit_code == 2 and "input_norm" in _error_line(r)
    r, _ = _run(cli, ds, model, tmp_path / "right", *OPTIONS[name])  # the same: resumed, nothing to do
    assert r.exit_code == 0, r.output


def test_metadata_gives_the_normalisation_and_the_command_line_overrides_it(tmp_path, analytic_model, cli, dataset):
    ds, truth = dataset
    model = unnormalising_detector(analytic_model, tmp_path / "meta.onnx", MMDET, metadata=True)
    r, rows = _run(cli, ds, model, tmp_path / "meta")
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) == []
    r, rows = _run(cli, ds, model, tmp_path / "override", "--input-scale", "1")  # the command line says all of it
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) != []
    assert json.loads((tmp_path / "override" / "run.json").read_text())["model"]["input_norm"] == \
        InputNorm().as_dict()


@pytest.mark.parametrize("args,option,text", [
    (["--mean", "123.675,116.28,103.53"], "'--mean'", "not within 0..1"),
    (["--std", "0,0.2,0.2"], "'--std'", "not above 0"),
    (["--std", "imagenet,1"], "'--std'", "is not 3 numbers"),
    (["--mean", "0.5,0.5"], "'--mean'", "is not 3 numbers"),
    (["--input-scale", "3"], "'--input-scale'", "'3' is not one of"),
    (["--input-scale", "255", "--mean", "300"], "'--mean'", "not within 0..255"),
])
def test_bad_values_are_one_error_line(tmp_path, analytic_model, cli, dataset, args, option, text):
    r, _ = _run(cli, dataset[0], analytic_model, tmp_path / "run", *args)
    assert r.exit_code == 2
    line = _error_line(r)
    assert option in line and text in line, line
    assert not (tmp_path / "run").exists()


def _with_metadata(model_path, dst, **props):
    """A copy of the model with these metadata entries added (or replaced)."""
    model = onnx.load(str(model_path))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
    onnx.save(model, str(dst))
    return dst


def test_bad_metadata_is_one_error_line(tmp_path, analytic_model, cli, dataset):
    r, _ = _run(cli, dataset[0], _with_metadata(analytic_model, tmp_path / "bad.onnx", std="0.2,0.2"), tmp_path / "run")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "'--model'" in line and "metadata's input normalisation" in line and "std '0.2,0.2'" in line, line


def test_int8_calibrates_on_normalised_images(tmp_path, analytic_model, dataset):
    from bulkdet.model.precision import Calibration, calibration_sample
    from bulkdet.run.calibration import decoded_batches

    plain = calibration_sample(Calibration(dataset[0], images=2, imgsz=64), analytic_model)
    normed = calibration_sample(Calibration(dataset[0], images=2, imgsz=64, norm=IMAGENET), analytic_model)
    assert "input_norm" not in plain.identity and normed.identity["input_norm"] == IMAGENET.as_dict()
    (a,), (b,) = list(decoded_batches(plain)), list(decoded_batches(normed))
    np.testing.assert_allclose(undo(b, IMAGENET), a, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [MMDET, MMDET_BGR], ids=["rgb", "bgr"])
@pytest.mark.parametrize("tile", [False, True])
def test_gpu_graph_normalises_as_the_cpu_graph(tmp_path, tile, norm):
    """DALI's GPU normalise pass (whole images and tiles), padding included; BGR from the GPU decoder."""
    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand

    data = write_image(tmp_path / "a.png", 600, 300, [Rect(1, 100, 50, 200, 120), Rect(0, 300, 100, 420, 220)],
                        fmt="png", seed=1).read_bytes()
    rows = pa.table({"image_id": [0], "shard": [0], "width": [600], "height": [300], "path": ["a"], "key": [b"a"]})
    items = expand(rows, TileSettings(256, overlap=0.25, full=True)) if tile else rows
    for batch in plan(items, 256, 4, fixed_hw=(256, 256)):  # the whole image padded above and below
        cpu = Decoder("cpu", max_batch=4, num_threads=1, norm=norm).decode(batch, [data] * len(batch))
        gpu = Decoder("gpu", max_batch=4, num_threads=1, norm=norm).decode(batch, [data] * len(batch))
        host = _to_host(gpu.tensor)
        # the same up to a level of the resize's rounding on the GPU, in 0..1 once undone
        np.testing.assert_allclose(undo(host, norm), undo(cpu.tensor, norm), atol=1.01 / 255)
        if not tile:  # the whole image, letterboxed: its top-left pixel is the normalised gray
            np.testing.assert_allclose(host[0, :, 0, 0], pad_values(norm), rtol=1e-6)
        assert gpu.errors == {} and host.shape == cpu.tensor.shape


def test_prepare_takes_the_same_options(tmp_path, analytic_model, cli, dataset):
    r = cli("prepare", analytic_model, "--precision", "int8", "--calib", dataset[0], "--mean", "300",
            "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 2
    assert "'--mean'" in _error_line(r) and "not within 0..1" in _error_line(r)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------ channel order (--channels)


def test_parse_channels():
    assert parse_norm(channels="bgr") == parse_norm(channels=" BGR ") == BGR and not BGR.is_default
    assert parse_norm(channels="rgb") == InputNorm() and parse_norm(channels=Channels.BGR) == BGR
    # mean/std are in the model's channel order: a preset too (mmdetection's BGR config numbers)
    assert parse_norm("255", "imagenet", "imagenet", "bgr") == InputNorm(
        255, tuple(v * 255 for v in IMAGENET_MEAN[::-1]), tuple(v * 255 for v in IMAGENET_STD[::-1]), Channels.BGR)
    assert parse_norm("255", "103.53,116.28,123.675", "57.375,57.12,58.395", "bgr") == MMDET_BGR
    # the channel order is in the identity only when BGR: an RGB run's identity is what it was before
    assert "channels" not in MMDET.as_dict() and InputNorm().as_dict() == {"input_scale": 1, "mean": [0.0] * 3,
                                                                            "std": [1.0] * 3}
    assert MMDET_BGR.as_dict() == {"input_scale": 255, "mean": [103.53, 116.28, 123.675],
                                   "std": [57.375, 57.12, 58.395], "channels": "bgr"}
    with pytest.raises(ValueError, match="channels 'grb' is not one of rgb, bgr"):
        parse_norm(channels="grb")


@pytest.mark.parametrize("rgb,bgr", [(InputNorm(), BGR), (MMDET, MMDET_BGR)], ids=["plain", "mmdet"])
def test_every_decode_path_gives_the_models_channel_order(rgb, bgr):
    """DALI (whole images), the Pillow fallback (a GIF DALI rejects) and a failed image's row: a BGR
    model gets the RGB input with its channels reversed, mean/std applied in its own order."""
    images = [draw_upright(w, h, [Rect(0, 5, 5, 20, 20), Rect(2, 22, 22, 35, 35)], seed=s)
              for s, (w, h) in enumerate([(90, 40), (40, 70)])]
    encoded = [_png(images[0]), _gif(images[1]), b"not an image"]
    sizes = [(90, 40), (40, 70), (50, 50)]
    w = np.array([s[0] for s in sizes], np.int32)
    h = np.array([s[1] for s in sizes], np.int32)
    batch = Batch(0, 0, np.arange(3), [""] * 3, [b""] * 3, w, h, (64, 96), letterbox(w, h, 64, 96))
    plain = Decoder("cpu", max_batch=4, num_threads=1, norm=rgb).decode(batch, encoded)
    out = Decoder("cpu", max_batch=4, num_threads=1, norm=bgr).decode(batch, encoded)
    assert out.fallback == plain.fallback == [1] and set(out.errors) == set(plain.errors) == {2}
    np.testing.assert_allclose(out.tensor, plain.tensor[:, ::-1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out.tensor, plain.tensor, atol=0.01)  # red and blue: the order shows
    np.testing.assert_allclose(pillow_letterbox(encoded[0], batch, 0, norm=bgr),
                               pillow_letterbox(encoded[0], batch, 0, norm=rgb)[::-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["png", "gif"])  # gif: DALI rejects it, the Pillow fallback decodes the windows
@pytest.mark.parametrize("imgsz", [256, 320])  # 256: tiles keep their size (numpy path); 320: DALI's resize path
def test_tiles_give_the_models_channel_order(monkeypatch, fmt, imgsz):
    from bulkdet.run import decode
    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand

    image = draw_upright(600, 300, [Rect(0, 100, 50, 200, 120), Rect(2, 300, 100, 420, 220)], seed=1)
    data = _png(image) if fmt == "png" else _gif(image)
    rows = pa.table({"image_id": [0], "shard": [0], "width": [600], "height": [300], "path": ["a"], "key": [b"a"]})
    placed = []  # items letterboxed by numpy (the CPU tile path), not by DALI
    real = decode._letterbox_pixels
    monkeypatch.setattr(decode, "_letterbox_pixels", lambda *a, **k: placed.append(a[2]) or real(*a, **k))
    batches = list(plan(expand(rows, TileSettings(256, overlap=0.25, full=False)), imgsz, 4))
    for batch in batches:
        plain = Decoder("cpu", max_batch=4, num_threads=1, norm=MMDET).decode(batch, [data] * len(batch))
        out = Decoder("cpu", max_batch=4, num_threads=1, norm=MMDET_BGR).decode(batch, [data] * len(batch))
        assert out.errors == plain.errors == {} and bool(out.fallback) == bool(plain.fallback) == (fmt == "gif")
        np.testing.assert_allclose(out.tensor, plain.tensor[:, ::-1], rtol=1e-6, atol=1e-6)
        assert not np.allclose(out.tensor, plain.tensor, atol=0.01)
    items = sum(len(b) for b in batches)
    assert len(placed) == (2 * items if imgsz == 256 else 0)  # each path was the one meant


def _swapped(rows):
    """Detections as an RGB-fed BGR model reports them: red and blue exchanged."""
    return [{**d, "class_id": 2 - d["class_id"]} for d in rows]


def test_bgr_model_finds_the_exact_boxes_only_with_channels_bgr(tmp_path, analytic_model, cli, dataset):
    ds, truth = dataset
    assert any(r[0] != 1 for t in truth for r in t["rects"])  # a red or blue rectangle to swap
    model = unnormalising_detector(analytic_model, tmp_path / "bgr.onnx", BGR)
    r, rows = _run(cli, ds, model, tmp_path / "rgb")  # fed RGB: red is seen as blue and blue as red
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) != [] and compare_with_truth(truth, _swapped(rows)) == []
    r, rows = _run(cli, ds, model, tmp_path / "bgr", "--channels", "bgr")
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) == []
    run = json.loads((tmp_path / "bgr" / "run.json").read_text())
    assert run["model"]["input_norm"] == BGR.as_dict() and run["model"]["input_norm"]["channels"] == "bgr"
    # A resumed run with another channel order is refused; the same one resumes.
    r, _ = _run(cli, ds, model, tmp_path / "bgr")
    assert r.exit_code == 2 and "input_norm" in _error_line(r) and "--overwrite" in _error_line(r)
    r, _ = _run(cli, ds, model, tmp_path / "bgr", "--channels", "bgr")
    assert r.exit_code == 0, r.output
    # rgb given is the default: a run made without the option (or before it existed) resumes with it
    r, _ = _run(cli, ds, model, tmp_path / "rgb", "--channels", "rgb")
    assert r.exit_code == 0, r.output
    r, _ = _run(cli, ds, model, tmp_path / "rgb", "--channels", "bgr")
    assert r.exit_code == 2 and "input_norm" in _error_line(r)


def test_metadata_gives_the_channel_order_and_a_norm_option_decides_it_too(tmp_path, analytic_model, cli, dataset):
    ds, truth = dataset
    model = unnormalising_detector(analytic_model, tmp_path / "yolox.onnx", YOLOX_BGR, metadata=True)
    r, rows = _run(cli, ds, model, tmp_path / "meta")  # input_scale 255 and channels BGR, from the metadata
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) == []
    assert json.loads((tmp_path / "meta" / "run.json").read_text())["model"]["input_norm"] == YOLOX_BGR.as_dict()
    # Any norm option given says all of it: --input-scale 255 alone is RGB, the classes swap ...
    r, rows = _run(cli, ds, model, tmp_path / "scale", "--input-scale", "255")
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) != [] and compare_with_truth(truth, _swapped(rows)) == []
    # ... and --channels is one of them: alone, the scale is the default 1 (nothing found right)
    r, rows = _run(cli, ds, model, tmp_path / "channels", "--channels", "bgr")
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) != []
    assert json.loads((tmp_path / "channels" / "run.json").read_text())["model"]["input_norm"] == BGR.as_dict()


def test_bad_channels_are_one_error_line(tmp_path, analytic_model, cli, dataset):
    r, _ = _run(cli, dataset[0], analytic_model, tmp_path / "run", "--channels", "brg")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "'--channels'" in line and "'brg' is not one of" in line, line
    assert not (tmp_path / "run").exists()
    bad = _with_metadata(analytic_model, tmp_path / "bad.onnx", channels="bgra")
    r, _ = _run(cli, dataset[0], bad, tmp_path / "run")
    assert r.exit_code == 2
    line = _error_line(r)
    assert "'--model'" in line and "channels 'bgra' is not one of rgb, bgr" in line, line
    r = cli("prepare", analytic_model, "--precision", "int8", "--calib", dataset[0], "--channels", "brg",
            "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 2 and "'--channels'" in _error_line(r)
    assert not (tmp_path / "cache").exists()


def test_int8_calibrates_on_images_in_the_models_channel_order(analytic_model, dataset):
    from bulkdet.model.precision import Calibration, calibration_sample
    from bulkdet.run.calibration import decoded_batches

    plain = calibration_sample(Calibration(dataset[0], images=2, imgsz=64), analytic_model)
    bgr = calibration_sample(Calibration(dataset[0], images=2, imgsz=64, norm=BGR), analytic_model)
    assert bgr.identity["input_norm"] == {"input_scale": 1, "mean": [0.0] * 3, "std": [1.0] * 3, "channels": "bgr"}
    (a,), (b,) = list(decoded_batches(plain)), list(decoded_batches(bgr))
    np.testing.assert_allclose(b, a[:, ::-1], atol=1e-6)


def test_precision_check_reference_gets_the_channel_order(tmp_path, analytic_model, cli, dataset):
    """fp16 takes float16 input: the FP32 reference decodes with a decoder of its own, the same order."""
    ds, truth = dataset
    model = unnormalising_detector(analytic_model, tmp_path / "bgr.onnx", BGR)
    r, rows = _run(cli, ds, model, tmp_path / "run", "--channels", "bgr", "--precision", "fp16",
                   "--check-precision", "4", "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert compare_with_truth(truth, rows) == []
    check = json.loads((tmp_path / "run" / "run.json").read_text())["precision_check"]
    assert check["matched"] == check["reference_boxes"] == check["boxes"] > 0 and check["drifting"] == 0
