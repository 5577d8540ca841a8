"""Shared fixtures: tiny shard sets built from scikit-image's bundled photos."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """64 crops at 32x32 in 8 shards of 8."""
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(random_crops(64, 32, seed=1), out, 32, 8, progress=False)
    return out


@pytest.fixture(scope="session")
def demo64_shards(tmp_path_factory) -> Path:
    """The same 64 crops at 64x64 in 8 shards of 8, for the ``demo64`` model."""
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards64")
    write_shards(random_crops(64, 64, seed=1), out, 64, 8, progress=False)
    return out


def run_config(tmp_path: Path, shards: Path, **sections) -> Path:
    """Write a small CPU run config; keyword arguments update whole sections' keys."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "demo32"},
        "data": {"shards": str(shards), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
        "train": {"max_steps": 3, "inner_steps": 2},
        "log": {"every_steps": 1, "image_every_steps": 2, "progress": False},
        "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DS_ACCELERATOR"] = "cpu"
    return env


PYTHON = sys.executable


def run_script(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path = REPO):
    """Run ``python <args>`` from ``cwd`` (the repository root), capturing its output."""
    return subprocess.run(
        [PYTHON, *args],
        cwd=cwd,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port, with one bucket; yields (url prefix, options)."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Created with boto3 and no region: s3fs.mkdir with a region fails against moto.
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket="lcm-test")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    yield "s3://lcm-test", options
    server.stop()


@pytest.fixture
def faulty_s3(s3_server):
    """A ``FaultyS3Proxy`` in front of ``s3_server`` (no faults until asked); yields
    (proxy, url prefix, storage options that reach the bucket through the proxy)."""
    from tests.s3_faults import FaultyS3Proxy

    prefix, options = s3_server
    proxy = FaultyS3Proxy(options["endpoint_url"])
    try:
        yield proxy, prefix, {**options, "endpoint_url": proxy.url}
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo64_shards):
    """A finished 16-step run of the ``demo64`` model (one epoch: every row trained) with a
    checkpoint at step 8. Not ``demo32``: its generator's 1x1 bottleneck cannot train phi (a
    batch of fresh latents, all equal, has zero BatchNorm variance there)."""
    tmp = tmp_path_factory.mktemp("export-run")
    cfg_path = run_config(
        tmp,
        demo64_shards,
        model={"preset": "demo64"},
        train={"max_steps": 16, "inner_steps": 4},
        store={"rows_per_chunk": 8},
        checkpoint={"every_steps": 8},
        log={"every_steps": 8, "image_every_steps": 0},
    )
    proc = run_script("launch/train.py", "--config", str(cfg_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, trained_run) -> Path:
    """The export of ``trained_run``."""
    from lcm_dist.export import export_run

    out = tmp_path_factory.mktemp("export") / "model.zarr"
    export_run(trained_run, str(out), progress=False)
    return out
