"""Shared fixtures: small real data (Pillow images, the analytic ONNX detector), CLI runners."""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bulkdet.cli import app
from bulkdet.synthetic import build_analytic_detector, random_rects, write_image
from bulkdet.system.devices import GpuStatus
from bulkdet.system.devices import probe as probe_gpu_path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def gpu_status() -> GpuStatus:
    """What this machine has for the GPU path, as `bulkdet run` sees it; probed once per session."""
    return probe_gpu_path()


@pytest.hookimpl(trylast=True)  # after -m has deselected: `-m "not gpu"` never probes
def pytest_collection_modifyitems(config, items):
    """GPU tests skip, with the reason, on machines where bulkdet finds no NVIDIA GPU."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not gpu_status().gpus:
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {gpu_status().missing.get('driver', 'none found')}")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def analytic_model(tmp_path_factory) -> Path:
    """The exact red/green/blue rectangle detector (YOLOv8 layout, dynamic B/H/W)."""
    return build_analytic_detector(tmp_path_factory.mktemp("model") / "analytic.onnx")


def make_images(folder: Path, specs, seed: int = 0) -> list[dict]:
    """Write images from (relpath, width, height, fmt, orientation) specs; returns their truth."""
    rng = np.random.default_rng(seed)
    truth = []
    for i, (rel, w, h, fmt, orientation) in enumerate(specs):
        rects = random_rects(w, h, int(rng.integers(1, 4)), rng)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(folder / rel, w, h, rects, fmt=fmt, orientation=orientation, seed=seed * 1000 + i)
        truth.append({"path": rel, "width": w, "height": h, "rects": [r.as_list() for r in rects]})
    return truth


@pytest.fixture
def cli():
    """Runs `bulkdet ARGS...` in-process; returns the typer Result (exit_code, output)."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def run_bulkdet(*args, **kwargs) -> subprocess.CompletedProcess:
    """Runs bulkdet in a child process (for kill / exit-code tests)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bulkdet", *map(str, args)], env=env,
                          capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, analytic_model) -> dict:
    """The demo's images (known truth, sub-folders, EXIF orientations, JPEG and PNG) plus one
    corrupt file, packed and run by the analytic detector: a finished run folder to read back."""
    from bulkdet.synthetic import make_demo_images
    from bulkdet.ingest.pack import pack
    from bulkdet.run.runner import RunConfig, run

    root = tmp_path_factory.mktemp("demo_run")
    truth = make_demo_images(root / "images", n=16, truth_path=root / "truth.json")
    (root / "images" / "set_a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    pack(root / "images", root / "dataset", shard_size_mb=0.5, quiet=True)  # several shards
    run(RunConfig(root / "dataset", analytic_model, root / "run", quiet=True, commit_images=5))  # several parts
    return {"root": root, "truth": truth, "run": root / "run", "dataset": root / "dataset",
            "images": root / "images"}


# --- object stores: a real S3-compatible server on 127.0.0.1 (moto's server mode) ------------

@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server in a thread on a free local port; stopped after the module."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    return s3_server


_users = itertools.count()


@pytest.fixture
def s3_user(s3_env):
    """(access key id, secret key) of an IAM user allowed S3, on a server that checks every request's
    signature from now on (moto's default takes any key, and no key at all); back to that after."""
    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=s3_env, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    user = f"runner-{os.getpid()}-{next(_users)}"  # moto's accounts live as long as the process
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    requests.post(f"{s3_env}/moto-api/reset-auth", data=b"0").raise_for_status()
    yield key["AccessKeyId"], key["SecretAccessKey"]
    requests.post(f"{s3_env}/moto-api/reset-auth", data=b"inf").raise_for_status()
