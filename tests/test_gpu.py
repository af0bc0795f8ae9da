"""The GPU path on a real GPU: DALI "mixed" decode handed to ONNX Runtime CUDA / TensorRT.

Marked `gpu`: conftest skips them, with the reason, on machines without an NVIDIA GPU.
TensorRT tests also skip when the tensorrt module is missing (its wheels come from NVIDIA's
own index, which some machines cannot reach).
"""

import json

import numpy as np
import pytest
from conftest import gpu_status
from conv_detector import build_conv_detector, packed_dataset

from bulkdet.synthetic import compare_with_truth
from bulkdet.store.parts import read_detections

pytestmark = pytest.mark.gpu

SPECS = [(f"g{i}.jpg", 200 + 40 * i, 150 + 20 * (i % 3), "jpeg", (1, 6, 3, 8)[i % 4]) for i in range(12)]
SPECS += [("p.png", 300, 200, "png", 1)]


def _needs(backend: str):
    status = gpu_status()
    if not status.backend_ok(backend):
        pytest.skip(f"GPU path with {backend} not usable here: {'; '.join(status.problems(backend))}")


@pytest.fixture(scope="module")
def gpu_dataset(tmp_path_factory):
    return packed_dataset(tmp_path_factory.mktemp("gpu"), SPECS)


def _boxes(run_dir):
    rows = read_detections(run_dir).to_pylist()
    return {(r["path"], r["class_id"]): np.array([r["x1"], r["y1"], r["x2"], r["y2"]]) for r in rows}


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_gpu_run_matches_cpu_within_one_pixel(cli, analytic_model, gpu_dataset, tmp_path, backend):
    _needs(backend)
    ds, truth = gpu_dataset
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert cli("run", ds, "--model", analytic_model, "--out", cpu, "--device", "cpu", "-q").exit_code == 0
    r = cli("run", ds, "--model", analytic_model, "--out", gpu, "--device", "gpu", "--backend", backend,
            "--cache-dir", tmp_path / "cache", "-q")
    assert r.exit_code == 0, r.output
    run_json = json.loads((gpu / "run.json").read_text())
    assert run_json["device"] == "gpu" and run_json["backend"] == backend
    a, b = _boxes(cpu), _boxes(gpu)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1.0, f"a box moved {worst:.2f} px between CPU and GPU"
    assert not compare_with_truth(truth, read_detections(gpu).to_pylist())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_on_gpu_does_not_drift(cli, gpu_dataset, tmp_path, precision):
    _needs("onnxruntime")
    ds, truth = gpu_dataset
    model = build_conv_detector(tmp_path / "conv.onnx")
    r = cli("run", ds, "--model", model, "--out", tmp_path / "run", "--device", "gpu", "--backend", "onnxruntime",
            "--precision", precision, "--check-precision", 8, "--calib-images", 8, "--cache-dir", tmp_path / "c", "-q")
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "run" / "run.json").read_text())["precision_check"]
    assert check["images"] == 8 and check["drifting"] == 0
    assert not compare_with_truth(truth, read_detections(tmp_path / "run").to_pylist())


def test_input_ring_round_trip_and_hand_off_from_dali(gpu_dataset):
    _needs("onnxruntime")
    from bulkdet.run.decode import Decoder
    from bulkdet.engines.cuda import InputRing, Stream
    from bulkdet.run.plan import plan_batches
    from bulkdet.store.manifest import read_manifest
    from bulkdet.store.shards import ShardReader

    ds, _ = gpu_dataset
    (batch, *_) = plan_batches(read_manifest(ds), (320, 320), 4)
    encoded = ShardReader(ds / "shards").get_many(batch.shard, batch.keys)
    expected = Decoder("cpu", 4).decode(batch, encoded).tensor
    decoded = Decoder("gpu", 4, hw_decoder_load=0.5).decode(batch, encoded).tensor
    ring = InputRing(2, expected.size, np.float32)
    slot = ring.stage(decoded)  # device to device: DALI's output into the engine's buffer
    back = np.empty_like(expected)
    stream = Stream()
    ring.buffers[slot.index].download(back, stream)
    stream.synchronize()
    assert slot.shape == expected.shape
    assert np.abs(back - expected).max() < 0.1  # nvJPEG and libjpeg-turbo differ by a few levels
    host_slot = ring.stage(expected)  # a host batch (the decoder's rare fallback path) uploads
    assert host_slot.index != slot.index
    ring.release(slot)
    ring.release(host_slot)
    ring.close()


def test_tensorrt_engine_is_cached_and_reused(analytic_model, tmp_path):
    _needs("tensorrt")
    from bulkdet.engines.tensorrt import TensorRTEngine

    shapes = [(4, 320, 320), (2, 320, 320), (4, 256, 320)]
    first = TensorRTEngine(analytic_model, shapes=shapes, cache_dir=tmp_path)
    engines = list((tmp_path / "tensorrt").glob("*.engine"))
    assert len(engines) == 1 and list((tmp_path / "tensorrt").glob("timing-*.cache"))
    x = np.zeros((2, 3, 256, 320), np.float32)
    x[:, 0, 10:50, 20:80] = 1.0
    out = first.infer(x)[0]
    assert out[0, :4, 0].tolist() == [50.0, 30.0, 60.0, 40.0]
    first.close()
    mtime = engines[0].stat().st_mtime
    second = TensorRTEngine(analytic_model, shapes=shapes, cache_dir=tmp_path)
    assert engines[0].stat().st_mtime == mtime  # loaded, not rebuilt
    np.testing.assert_array_equal(second.infer(x)[0], out)
    second.close()
