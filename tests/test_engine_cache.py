"""TensorRT's pure parts, testable without TensorRT: optimisation profiles and cache keys."""

import numpy as np
import pytest

from bulkdet.engines.tensorrt import (Profile, engine_cache_key, engine_cache_path, optimization_profiles,
                                      profile_for, timing_cache_path)


def test_profiles_per_shape_cover_short_batches():
    shapes = [(32, 640, 640)] * 5 + [(7, 640, 640), (32, 384, 640), (3, 384, 640)]
    profiles = optimization_profiles(shapes)
    assert profiles == [Profile((1, 3, 384, 640), (32, 3, 384, 640), (32, 3, 384, 640)),
                        Profile((1, 3, 640, 640), (32, 3, 640, 640), (32, 3, 640, 640))]
    assert profile_for(profiles, (7, 3, 640, 640)) == 1 and profile_for(profiles, (1, 3, 384, 640)) == 0
    with pytest.raises(ValueError, match="outside every optimisation profile"):
        profile_for(profiles, (33, 3, 640, 640))


def test_many_shapes_share_one_spanning_profile_optimised_for_the_busiest():
    shapes = [(16, 640, 640)] + [(16, 640, w) for w in (320, 384, 448, 512)] * 2 + [(16, 256, 640)] * 3
    (profile,) = optimization_profiles(shapes, max_profiles=4)
    assert profile.min == (1, 3, 256, 320) and profile.max == (16, 3, 640, 640)
    assert profile.opt == (16, 3, 256, 640)  # 48 images at 256x640, the most of any shape
    assert profile_for([profile], (5, 3, 640, 384)) == 0


def test_static_dimensions_of_the_onnx_win():
    (profile,) = optimization_profiles([(32, 640, 640), (3, 640, 640)], static=(1, 640, 640))
    assert profile == Profile((1, 3, 640, 640), (1, 3, 640, 640), (1, 3, 640, 640))
    with pytest.raises(ValueError, match="no batch shapes"):
        optimization_profiles([])


def test_engine_cache_key_changes_with_everything_that_makes_an_engine_incompatible(tmp_path):
    profiles = optimization_profiles([(32, 640, 640)])
    base = ("a" * 64, "10.9.0", "NVIDIA H100 80GB HBM3", (9, 0), profiles)
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base)
    variants = [("b" * 64,) + base[1:], base[:1] + ("11.0.0",) + base[2:], base[:2] + ("NVIDIA L4",) + base[3:],
                base[:3] + ((8, 9),) + base[4:], base[:4] + (optimization_profiles([(16, 640, 640)]),)]
    assert len({key} | {engine_cache_key(*v) for v in variants}) == 6
    assert engine_cache_path(tmp_path, tmp_path / "m.int8.onnx", key).name == f"m.int8.{key[:16]}.engine"
    assert timing_cache_path(tmp_path, "10.9.0", "NVIDIA H100 80GB HBM3", (9, 0)).name == \
        "timing-trt10.9.0-nvidia-h100-80gb-hbm3-sm90.cache"


def test_staged_batches_split_into_views_for_the_out_of_memory_retry():
    from bulkdet.engines.base import InputSlot, ring_elements
    from bulkdet.run.oom import HalvingInfer

    slot = InputSlot(index=2, ptr=1_000_000, shape=(5, 3, 4, 8), dtype=np.dtype(np.float16))
    seen = []

    def infer(piece):  # runs out of memory above 2 images, like an engine would
        if len(piece) > 2:
            raise RuntimeError("CUDA error cudaErrorMemoryAllocation: out of memory")
        seen.append(piece)
        return [np.full((len(piece), 6), piece.ptr, np.float64)]

    (out,) = HalvingInfer(infer)(slot)
    per_image = 3 * 4 * 8 * 2
    assert [(len(p), p.ptr, p.owner) for p in seen] == [
        (2, 1_000_000, False), (2, 1_000_000 + 2 * per_image, False), (1, 1_000_000 + 4 * per_image, False)]
    assert out.shape == (5, 6) and all(p.index == 2 and p.shape[1:] == (3, 4, 8) for p in seen)
    assert slot[0:5] is slot and slot[:] is slot  # the whole batch is the slot itself (released by its owner)
    assert ring_elements([(32, 640, 640), (32, 384, 640), (16, 640, 800)]) == 32 * 3 * 640 * 640
