"""Read throughput of each input source (docs/inputs.md): `pack` from a folder, a list of paths,
a tar, a tar.gz and a local S3-compatible server (moto, 127.0.0.1), by copy and by reference;
then what a run's read stage gets from each dataset (its shards vs. the source, by reference).

    PYTHONPATH=. python benchmarks/inputs.py [--images 1500] [--side 1024] [--json out.json]

Images are noisy JPEGs (about 0.2 MB at 1024x768) in a page-cache-warm temporary folder, so the
figures show bulkdet's own cost per source, not a disk's; the S3 server runs on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bulkdet.ingest.pack import pack
from bulkdet.store.manifest import processed, read_manifest
from bulkdet.store.readers import open_dataset_reader


def make_images(folder: Path, n: int, side: int) -> int:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8)
    total = 0
    for i in range(n):
        sub = folder / f"cam{i % 10:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        img = np.roll(np.roll(base, i % side, axis=1), i // side, axis=0)  # every image differs
        path = sub / f"img_{i:06d}.jpg"
        Image.fromarray(img).save(path, quality=70)
        total += path.stat().st_size
    return total


def timed_pack(name: str, src, out: Path, **kw) -> dict:
    t = time.perf_counter()
    s = pack(src, out, quiet=True, **kw)
    dt = time.perf_counter() - t
    return {"what": f"pack {name}", "files": s.found, "MB": s.read_bytes / 1e6, "s": dt,
            "files_s": s.found / dt, "MB_s": s.read_bytes / 1e6 / dt,
            "dataset_MB": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6}


def timed_read(name: str, dataset: Path, batch: int = 32) -> dict:
    """The run's read stage alone: every row's bytes through the dataset's reader, in planner-sized calls."""
    rows = processed(read_manifest(dataset)).sort_by([("shard", "ascending")])
    shard, ids, keys = rows.column("shard").to_pylist(), rows.column("image_id").to_pylist(), rows.column("key").to_pylist()
    reader = open_dataset_reader(dataset)
    t, n, nbytes = time.perf_counter(), 0, 0
    try:
        for i in range(0, len(ids), batch):
            for data in reader.read(shard[i], ids[i:i + batch], keys[i:i + batch]):
                assert isinstance(data, bytes), data
                n, nbytes = n + 1, nbytes + len(data)
    finally:
        reader.close()
    dt = time.perf_counter() - t
    return {"what": f"run read stage: {name}", "files": n, "MB": nbytes / 1e6, "s": dt,
            "files_s": n / dt, "MB_s": nbytes / 1e6 / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "images"
        make_images(src, args.images, args.side)
        names = sorted(str(p.relative_to(src)) for p in src.rglob("*.jpg"))
        (tmp / "list.txt").write_text("\n".join(f"images/{n}" for n in names) + "\n")
        for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
            with tarfile.open(tmp / f"images{suffix}", mode) as tar:
                tar.add(src, arcname="images")

        results.append(timed_pack("folder, copy", src, tmp / "ds-dir"))
        results.append(timed_pack("folder, reference", src, tmp / "ds-dir-ref", reference=True))
        results.append(timed_pack("list of paths, copy", tmp / "list.txt", tmp / "ds-list"))
        results.append(timed_pack("tar, copy", tmp / "images.tar", tmp / "ds-tar"))
        results.append(timed_pack("tar, reference", tmp / "images.tar", tmp / "ds-tar-ref", reference=True))
        results.append(timed_pack("tar.gz, copy", tmp / "images.tar.gz", tmp / "ds-tgz"))

        from moto.server import ThreadedMotoServer
        import s3fs

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
            fs = s3fs.S3FileSystem(**options)
            fs.mkdir("bench")
            fs.pipe({f"bench/images/{n}": (src / n).read_bytes() for n in names})
            results.append(timed_pack("local S3 (moto), copy", "s3://bench/images", tmp / "ds-s3",
                                      storage_options=options))
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")  # the run's credentials
            results.append(timed_pack("local S3 (moto), reference", "s3://bench/images", tmp / "ds-s3-ref",
                                      reference=True, storage_options=options))
            for name, ds in (("copy (LMDB shards)", "ds-dir"), ("folder by reference", "ds-dir-ref"),
                             ("tar by reference", "ds-tar-ref"), ("local S3 by reference", "ds-s3-ref")):
                results.append(timed_read(name, tmp / ds))
        finally:
            server.stop()

    print(f"{args.images} JPEGs, {results[0]['MB'] / args.images:.2f} MB each, {os.cpu_count()} CPUs")
    print(f"{'':44} {'files/s':>8} {'MB/s':>8} {'dataset MB':>11}")
    for r in results:
        ds = f"{r['dataset_MB']:11.2f}" if "dataset_MB" in r else ""
        print(f"{r['what']:44} {r['files_s']:8.0f} {r['MB_s']:8.1f} {ds}")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
