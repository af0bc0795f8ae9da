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
