"""INT8 calibration images: the chosen images of the dataset, decoded and letterboxed by the run's
own DALI graph (on the CPU), so the ranges are measured on exactly what the model will see."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from bulkdet.model.precision import CalibrationSample
from bulkdet.run.decode import Decoder
from bulkdet.run.plan import plan_batches
from bulkdet.store.readers import open_dataset_reader


def decoded_batches(sample: CalibrationSample, storage_options: dict | None = None) -> Iterator[np.ndarray]:
    """Float32 [n,3,H,W] batches of the sample's images; images that fail to decode are left out.
    `storage_options`: the run's, for a dataset packed by reference from a URL."""
    reader = open_dataset_reader(sample.dataset, storage_options=storage_options)
    decoder = Decoder("cpu", sample.max_batch, out_dtype=np.float32, norm=sample.norm)
    try:
        for batch in plan_batches(sample.rows, sample.input_hw, sample.max_batch):
            encoded = [data if isinstance(data, bytes) else b"" for data in
                       reader.read(batch.shard, batch.image_ids, batch.keys)]
            decoded = decoder.decode(batch, encoded)
            good = [i for i in range(len(batch)) if i not in decoded.errors]
            if good:
                yield np.ascontiguousarray(decoded.tensor[good])
    finally:
        reader.close()
