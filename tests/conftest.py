"""Shared fixtures: tiny shard sets built from scikit-image's bundled photos, a local S3
server, one small trained run and its export, and the launch scripts run in-process."""

from __future__ import annotations

import os

# One thread per process, in this process and (through the environment) in the subprocesses
# as before: the suite runs beside other processes on few cores, where a second OpenMP thread
# that waits for a busy core makes each step many times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import REPO, Completed, call_main, free_port, run_config, run_script  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch came in earlier


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
    """The suite's one trained run, for every test that only reads a run's outputs: 16 steps
    of 8 inner steps of the ``demo64`` model (one epoch: every row trained) with a checkpoint at step 8, loss
    logged every 4 steps and reconstructions every 8, trained by ``python launch/train.py`` as
    a user runs it. Not ``demo32``: its generator's 1x1 bottleneck cannot train phi (a batch of
    fresh latents, all equal, has zero BatchNorm variance there). Tests must not change it."""
    tmp = tmp_path_factory.mktemp("trained-run")
    cfg_path = run_config(
        tmp,
        demo64_shards,
        model={"preset": "demo64"},
        train={"max_steps": 16, "inner_steps": 8},
        store={"rows_per_chunk": 8},
        checkpoint={"every_steps": 8},
        log={"every_steps": 4, "image_every_steps": 8},
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


@pytest.fixture
def cli(capfd):
    """``cli("train", "--config", path)``: ``launch/train.py``'s ``main`` run in this process;
    returns its exit status and what it printed, as ``subprocess.run`` would."""

    def call(script: str, *argv, env: dict | None = None, cwd: Path = REPO) -> Completed:
        capfd.readouterr()
        code = call_main(script, list(argv), env, cwd)
        out, err = capfd.readouterr()
        return Completed(code, out, err)

    return call
