"""On-disk stores: LMDB shards of encoded images and the Parquet manifest."""
