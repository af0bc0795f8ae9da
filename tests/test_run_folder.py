import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bulkdet.run.postprocess import Detections
from bulkdet.store.parts import read_detections, read_images
from bulkdet.store.run_folder import ConfigMismatch, PartWriter, RunFolder


def dets(n, cls=0):
    return Detections(np.tile(np.array([[1, 2, 3, 4]], np.float32), (n, 1)), np.full(n, 0.5, np.float32),
                      np.full(n, cls, np.int16))


def add(sink, shard, ids, detections):
    n = len(ids)
    sink.add_images(shard, ids, [f"p{i}" for i in ids], [10] * n, [20] * n,
                    ["ok" if d is not None else "decode_error" for d in detections],
                    [None if d is not None else "bad" for d in detections], detections)


def test_parts_per_shard_schema_metadata_and_journal(tmp_path):
    RunFolder.open(tmp_path, {"model_sha256": "x"})._release()
    sink = PartWriter(tmp_path, {0: "cat", 1: "dog"}, {"model_sha256": "x"}, commit_images=100)
    add(sink, 0, [0, 1], [dets(2), dets(1, cls=1)])
    add(sink, 1, [2], [None])  # new shard: shard 0's rows are committed first
    sink.close()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "part-s00000-00000.parquet", "part-s00001-00000.parquet"]
    images = read_images(tmp_path)
    assert images.column("n_det").to_pylist() == [2, 1, 0]
    assert images.column("status").to_pylist() == ["ok", "ok", "decode_error"]
    d = read_detections(tmp_path)
    assert d.column("class_name").to_pylist() == ["cat", "cat", "dog"]
    assert d.schema.field("class_name").type.value_type == "string"
    meta = pq.read_schema(tmp_path / "images" / "part-s00000-00000.parquet").metadata
    assert meta[b"model_sha256"] == b"x"
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [(j["part"], j["images"], j["failed"]) for j in journal] == [
        ("part-s00000-00000.parquet", 2, 0), ("part-s00001-00000.parquet", 1, 1)]


def test_resume_skips_committed_and_drops_uncommitted(tmp_path):
    fp = {"model_sha256": "x", "conf": 0.25}
    RunFolder.open(tmp_path, fp)._release()
    sink = PartWriter(tmp_path, {}, {}, commit_images=2)
    add(sink, 0, [0, 1], [dets(1), dets(1)])  # committed (reaches commit_images)
    add(sink, 0, [2], [dets(1)])  # buffered only: lost when "killed"
    sink.journal.close()
    # What a kill leaves behind: a temp file and a detections part without its images part.
    (tmp_path / "images" / "part-s00000-00001.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "detections" / "part-s00000-00009.parquet").write_bytes(b"orphan")
    with RunFolder.open(tmp_path, fp) as folder:
        assert folder.done == {0, 1}
    assert not list(tmp_path.glob("*/*.tmp"))
    assert not (tmp_path / "detections" / "part-s00000-00009.parquet").exists()
    sink = PartWriter(tmp_path, {}, {}, commit_images=2)
    add(sink, 0, [2], [dets(1)])
    sink.close()
    assert sorted(read_images(tmp_path).column("image_id").to_pylist()) == [0, 1, 2]
    assert (tmp_path / "images" / "part-s00000-00001.parquet").exists()  # numbering continues


def test_other_settings_refused_unless_overwrite(tmp_path):
    RunFolder.open(tmp_path, {"model_sha256": "a", "conf": 0.25})._release()
    sink = PartWriter(tmp_path, {}, {}, commit_images=1)
    add(sink, 0, [0], [dets(1)])
    sink.close()
    with pytest.raises(ConfigMismatch, match="conf"):
        RunFolder.open(tmp_path, {"model_sha256": "a", "conf": 0.5})
    with RunFolder.open(tmp_path, {"model_sha256": "a", "conf": 0.5}, overwrite=True) as folder:
        assert folder.done == set()
    assert not list((tmp_path / "images").iterdir())
