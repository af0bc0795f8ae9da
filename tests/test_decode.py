"""The DALI letterbox puts each image exactly where the planner's geometry says."""

import io

import numpy as np
import pytest
from PIL import Image

from bulkdet.run.decode import PAD_VALUE, Decoder
from bulkdet.run.plan import Batch, letterbox


def png(w, h, color):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("input_hw", [(640, 640), (384, 640), (77, 101)])
def test_image_lands_at_the_planned_offset_with_gray_padding(input_hw):
    sizes = [(1920, 1080), (480, 640), (333, 517), (1000, 999), (64, 2000)]
    w = np.array([s[0] for s in sizes], np.int32)
    h = np.array([s[1] for s in sizes], np.int32)
    lb = letterbox(w, h, *input_hw)
    batch = Batch(0, 0, np.arange(len(sizes)), [""] * len(sizes), [b""] * len(sizes), w, h, input_hw, lb)
    out = Decoder("cpu", max_batch=8, num_threads=1).decode(batch, [png(*s, (255, 0, 0)) for s in sizes])
    assert out.errors == {} and out.tensor.shape == (len(sizes), 3, *input_hw)
    pad = PAD_VALUE / 255.0
    for i in range(len(sizes)):
        expected = np.full(input_hw, pad, np.float32)
        expected[lb.top[i]:lb.top[i] + lb.new_h[i], lb.left[i]:lb.left[i] + lb.new_w[i]] = 1.0
        np.testing.assert_allclose(out.tensor[i, 0], expected, atol=1e-6)  # red channel: image vs pad
        assert np.allclose(out.tensor[i, 1][expected == 1.0], 0.0)  # the image is pure red


def test_float16_output_for_fp16_models():
    w, h = np.array([100], np.int32), np.array([50], np.int32)
    batch = Batch(0, 0, np.arange(1), [""], [b""], w, h, (64, 64), letterbox(w, h, 64, 64))
    out = Decoder("cpu", max_batch=1, num_threads=1, out_dtype=np.float16).decode(batch, [png(100, 50, (0, 0, 255))])
    assert out.tensor.dtype == np.float16
    assert out.tensor[0, 2, 32, 32] == 1.0 and out.tensor[0, 2, 0, 0] == np.float16(PAD_VALUE / 255.0)


@pytest.mark.parametrize("budget", [10**9, 600 * 512])  # the whole image kept; bands of tile rows
def test_tiles_are_cut_from_the_upright_image_by_dali_and_by_the_fallback(tmp_path, budget):
    import pyarrow as pa

    from bulkdet.run.decode import pillow_letterbox
    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand
    from bulkdet.synthetic import Rect, draw_upright, write_image

    rects = [Rect(0, 600, 420, 660, 690), Rect(2, 100, 50, 130, 80)]
    data = write_image(tmp_path / "a.png", 900, 700, rects, fmt="png", orientation=6, seed=1).read_bytes()
    upright = draw_upright(900, 700, rects, seed=1)
    rows = pa.table({"image_id": [0], "shard": [0], "width": [900], "height": [700], "path": ["a"], "key": [b"a"]})
    batches = list(plan(expand(rows, TileSettings(256, overlap=0.25, full=False)), 256, 4))
    decoder = Decoder("cpu", max_batch=4, num_threads=1, decode_budget=budget)
    tiles = 0
    for batch in batches:  # the tiles of one image over several batches
        out = decoder.decode(batch, [data] * len(batch))
        assert out.errors == {} and out.tensor.shape == (len(batch), 3, 256, 256)
        for i in range(len(batch)):
            x, y = int(batch.tiles.x[i]), int(batch.tiles.y[i])
            window = upright[y:y + 256, x:x + 256].transpose(2, 0, 1) / 255.0
            np.testing.assert_allclose(out.tensor[i], window, atol=1e-6)  # a tile at scale 1: its pixels
            np.testing.assert_allclose(pillow_letterbox(data, batch, i), window, atol=1e-6)
            tiles += 1
    assert tiles == 20 and len(batches) == 5  # 5 x 4 tiles, the last column and row shifted inside


def test_an_image_the_fallback_decoded_is_kept_for_its_next_tiles():
    """A GIF (DALI's parser does not read GIF) whose tiles span batches: Pillow decodes it once,
    the later batches cut their tiles from the image kept, as for an image DALI decoded."""
    import pyarrow as pa

    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand

    picture = Image.new("RGB", (900, 700), (90, 90, 90))
    picture.paste((255, 0, 0), (600, 420, 660, 690))
    buf = io.BytesIO()
    picture.save(buf, "GIF")
    upright = np.asarray(picture)
    rows = pa.table({"image_id": [0], "shard": [0], "width": [900], "height": [700], "path": ["a"], "key": [b"a"]})
    batches = list(plan(expand(rows, TileSettings(256, overlap=0.25, full=False)), 256, 4))
    decoder = Decoder("cpu", max_batch=4, num_threads=1)
    fallback = []
    for batch in batches:
        out = decoder.decode(batch, [buf.getvalue()] * len(batch))
        assert out.errors == {}
        fallback.append(out.fallback)
        for i in range(len(batch)):
            x, y = int(batch.tiles.x[i]), int(batch.tiles.y[i])
            np.testing.assert_allclose(out.tensor[i], upright[y:y + 256, x:x + 256].transpose(2, 0, 1) / 255.0,
                                       atol=1e-6)
    assert fallback == [[0]] + [[]] * (len(batches) - 1) and len(batches) == 5


def test_the_full_pass_of_an_image_over_the_decode_budget_is_not_kept():
    """The full pass decodes an image whole, whatever its size; the decoder keeps for the next
    batches only what the decode budget allows (its tiles are then decoded by region)."""
    import pyarrow as pa

    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand

    budget = 2 * 256 * 256
    rows = pa.table({"image_id": [0], "shard": [0], "width": [900], "height": [700], "path": ["a"], "key": [b"a"]})
    batches = list(plan(expand(rows, TileSettings(256, overlap=0.25)), 256, 4, decode_budget=budget))
    decoder = Decoder("cpu", max_batch=4, num_threads=1, decode_budget=budget)
    data = png(900, 700, (255, 0, 0))
    whole = 0
    for batch in batches:
        out = decoder.decode(batch, [data] * len(batch))
        assert out.errors == {}
        whole += int((batch.width == 900).sum())
        kept = decoder._tiles.kept
        assert kept is None or (kept[1][2] - kept[1][0]) * (kept[1][3] - kept[1][1]) <= budget
    assert whole == 1  # the full pass ran, decoded whole


def test_tiles_scaled_into_the_input_go_through_the_resize(tmp_path):
    """--tile 512 at a 256 input: each tile is halved (bilinear at exactly 1/2: the mean of each
    2 x 2 block); tiles that keep their size are letterboxed in numpy (the tests above)."""
    import pyarrow as pa

    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand
    from bulkdet.synthetic import Rect, draw_upright, write_image

    rects = [Rect(1, 300, 200, 700, 500)]
    data = write_image(tmp_path / "a.png", 900, 700, rects, fmt="png", seed=2).read_bytes()
    upright = draw_upright(900, 700, rects, seed=2).astype(np.float32) / 255.0
    rows = pa.table({"image_id": [0], "shard": [0], "width": [900], "height": [700], "path": ["a"], "key": [b"a"]})
    decoder = Decoder("cpu", max_batch=4, num_threads=1)
    for batch in plan(expand(rows, TileSettings(512, overlap=0.2, full=False)), 256, 4):
        out = decoder.decode(batch, [data] * len(batch))
        assert out.errors == {} and out.tensor.shape == (len(batch), 3, 256, 256)
        for i in range(len(batch)):
            x, y = int(batch.tiles.x[i]), int(batch.tiles.y[i])
            window = upright[y:y + 512, x:x + 512]
            halved = window.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
            np.testing.assert_allclose(out.tensor[i], halved, atol=2e-3)


def test_an_image_over_the_decode_budget_is_decoded_in_bands_as_tall_as_the_budget(tmp_path):
    """2000 x 1000 over a budget of 600 rows, tiles of 256 every 192 rows, 4 tiles a batch: each
    band starts at the first batch not inside the kept one and is 600 rows tall, decoded once
    and kept for the batches inside it (a JPEG's region decode reads everything before the
    region, so fewer, taller bands cost less than one a batch's tile rows)."""
    import pyarrow as pa

    from bulkdet.run.plan import plan
    from bulkdet.run.tiles import TileSettings, expand
    from bulkdet.synthetic import Rect, draw_upright, write_image

    rects = [Rect(0, 900, 590, 960, 660)]
    data = write_image(tmp_path / "a.png", 2000, 1000, rects, fmt="png", seed=3).read_bytes()
    upright = draw_upright(2000, 1000, rects, seed=3)
    budget = 2000 * 600
    rows = pa.table({"image_id": [0], "shard": [0], "width": [2000], "height": [1000], "path": ["a"], "key": [b"a"]})
    decoder = Decoder("cpu", max_batch=4, num_threads=1, decode_budget=budget)
    decoded = []
    real = decoder._tiles._decode_regions
    decoder._tiles._decode_regions = lambda enc, images, *a: (decoded.extend(w for _, _, w in images),
                                                               real(enc, images, *a))
    tiles = 0
    for batch in plan(expand(rows, TileSettings(256, overlap=0.25, full=False)), 256, 4, decode_budget=budget):
        out = decoder.decode(batch, [data] * len(batch))
        for i in range(len(batch)):
            x, y = int(batch.tiles.x[i]), int(batch.tiles.y[i])
            np.testing.assert_allclose(out.tensor[i], upright[y:y + 256, x:x + 256].transpose(2, 0, 1) / 255.0,
                                       atol=1e-6)
            tiles += 1
    assert tiles == 11 * 5
    assert decoded == [(0, 0, 2000, 600), (0, 192, 2000, 792), (0, 384, 2000, 984), (0, 744, 2000, 1000)]
