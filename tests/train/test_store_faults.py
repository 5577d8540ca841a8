"""Training on an S3 store that fails: faulty requests, an outage, retries that run out, an
endpoint that refuses connections. Runs ride out what retries can fix and end bitwise equal
to a clean run; what they cannot fix stops the run with one clear line, and it resumes."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from lcm_dist.latents.store import LatentStore
from lcm_dist.train.checkpoint import find_latest
from tests.helpers import (
    PYTHON,
    REPO,
    assert_same_state,
    free_port,
    run_config,
    run_script,
    subprocess_env,
)

STEPS = 24  # 64 images in batches of 4: 16 steps per epoch, so the second epoch reads back
TIMEOUTS = {"connect_timeout": 1, "read_timeout": 3}


def fault_config(tmp_path, shards, name, url, options, **store):
    folder = tmp_path / name
    folder.mkdir()
    return run_config(
        folder,
        shards,
        train={"max_steps": STEPS, "inner_steps": 2, "deterministic": True},
        store={"rows_per_chunk": 4, "url": url, "storage_options": options, **store},
        checkpoint={"every_steps": 6, "keep_latest": 2},
        log={"every_steps": 4, "image_every_steps": 0, "progress": False},
    )


def start(cfg_path, out_dir, launcher=(PYTHON,)):
    """launch/train.py in the background, its output in files (no pipe to fill up)."""
    out = open(out_dir / "stdout.txt", "w")
    err = open(out_dir / "stderr.txt", "w")
    return subprocess.Popen(
        [*launcher, "launch/train.py", "--config", str(cfg_path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=out,
        stderr=err,
        text=True,
    )


def wait_for(predicate, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def final_state(cfg_path, options):
    """Generator weights and all latent rows of the run's newest commit (read without faults)."""
    from safetensors.torch import load_file

    cfg = json.loads(cfg_path.read_text())
    commit = find_latest(cfg["run_dir"])
    assert commit.state["step"] == STEPS
    store = LatentStore.open(cfg["store"]["url"], storage_options=options)
    store.restore_slots(commit.slots)
    rows = torch.from_numpy(store.read_rows(range(store.num_rows)))
    return load_file(str(commit.folder / "generator.safetensors")), rows


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, demo_shards, s3_server):
    """The reference: the same training on the same S3 server, reached directly."""
    prefix, options = s3_server
    tmp = tmp_path_factory.mktemp("clean")
    cfg = fault_config(tmp, demo_shards, "clean", f"{prefix}/{tmp.name}/latents.zarr", options)
    proc = run_script("launch/train.py", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_state(cfg, options)


@pytest.mark.slow
def test_failing_requests_and_an_outage_leave_the_result_unchanged(
    tmp_path, demo_shards, s3_server, faulty_s3, clean_run
):
    proxy, prefix, options = faulty_s3
    url = f"{prefix}/{tmp_path.name}/latents.zarr"
    cfg = fault_config(
        tmp_path,
        demo_shards,
        "faulty",
        url,
        {**options, "config_kwargs": TIMEOUTS},
        retries=100,
        retry_seconds=60,
    )
    proc = start(cfg, tmp_path / "faulty")
    try:
        # Once the run is training (its store is open), 20% of requests fail...
        log = tmp_path / "faulty" / "stdout.txt"
        wait_for(lambda: "lcm-dist:" in log.read_text(), proc, "the first log line")
        proxy.fail_fraction = 0.2
        # ...and after its first commit the endpoint goes away for 2 s and comes back.
        wait_for((tmp_path / "faulty" / "run" / "latest.json").exists, proc, "the first commit")
        proxy.stop()
        time.sleep(2.0)
        proxy.start()
        assert proc.wait(timeout=600) == 0, (tmp_path / "faulty" / "stderr.txt").read_text()
    finally:
        proc.kill()
        proc.wait()
    assert proxy.counts["slowdown"] and proxy.counts["internal"] and proxy.counts["drop"]
    assert_same_state(final_state(cfg, s3_server[1]), clean_run)
    # The run's own retries were needed (not only those inside s3fs), and were counted.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "faulty" / "run" / "tb"))
    acc.Reload()
    assert acc.Scalars("store/retries")[-1].value > 0


@pytest.mark.slow
def test_when_retries_run_out_the_run_stops_clearly_and_resumes(
    tmp_path, demo_shards, s3_server, faulty_s3, clean_run
):
    proxy, prefix, options = faulty_s3
    url = f"{prefix}/{tmp_path.name}/latents.zarr"
    cfg = fault_config(
        tmp_path,
        demo_shards,
        "outage",
        url,
        {**options, "config_kwargs": TIMEOUTS},
        retry_seconds=3,
    )
    run_dir = tmp_path / "outage" / "run"
    proc = start(cfg, tmp_path / "outage")
    try:
        wait_for((run_dir / "latest.json").exists, proc, "the first commit")
        proxy.stop()  # and it stays away for longer than store.retry_seconds
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    err = (tmp_path / "outage" / "stderr.txt").read_text()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"of latent store {url} failed " in last, err[-3000:]
    assert "chunk" in last or "slot table" in last
    assert "EndpointConnectionError" in last and "re-run the command" in last
    committed = find_latest(run_dir).state["step"]
    assert 0 < committed < STEPS

    # The endpoint is back: the same command resumes from the last commit and ends as a
    # clean run does.
    proxy.start()
    proc = run_script("launch/train.py", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step-{committed:08d}" in proc.stdout + proc.stderr
    assert_same_state(final_state(cfg, s3_server[1]), clean_run)


def test_an_endpoint_that_refuses_connections_is_a_clear_error_within_a_minute(
    tmp_path, demo_shards, cli
):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    url = "s3://lcm-test/refused/latents.zarr"
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    folder = tmp_path / "refused"
    folder.mkdir()
    cfg = run_config(folder, demo_shards, store={"url": url, "storage_options": options})
    began = time.monotonic()
    proc = cli("train", "--config", cfg)
    took = time.monotonic() - began
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert took < 60, f"the error took {took:.0f} s"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: opening the latent store {url} failed "), proc.stderr[-3000:]
    assert f'Could not connect to the endpoint URL: "{endpoint}/' in last
    assert "Traceback" not in proc.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_ride_out_failing_requests_and_end_as_a_clean_run(
    tmp_path, demo_shards, s3_server, faulty_s3
):
    """Both processes of a run read and write their own chunks through the faulty endpoint;
    the result equals the same two-process run on a healthy one."""
    proxy, prefix, options = faulty_s3

    def torchrun():
        return (PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2") + (
            "--master_port",
            str(free_port()),
        )

    clean = fault_config(
        tmp_path,
        demo_shards,
        "clean2",
        f"{s3_server[0]}/{tmp_path.name}-clean/latents.zarr",
        s3_server[1],
    )
    proc = start(clean, tmp_path / "clean2", torchrun())
    assert proc.wait(timeout=600) == 0, (tmp_path / "clean2" / "stderr.txt").read_text()[-3000:]
    faulty = fault_config(
        tmp_path,
        demo_shards,
        "faulty2",
        f"{prefix}/{tmp_path.name}-faulty/latents.zarr",
        {**options, "config_kwargs": TIMEOUTS},
        retries=100,
        retry_seconds=60,
    )
    proc = start(faulty, tmp_path / "faulty2", torchrun())
    try:
        log = tmp_path / "faulty2" / "stdout.txt"
        wait_for(lambda: "lcm-dist:" in log.read_text(), proc, "the first log line")
        proxy.fail_fraction = 0.2
        assert proc.wait(timeout=600) == 0, (tmp_path / "faulty2" / "stderr.txt").read_text()
    finally:
        proc.kill()
        proc.wait()
    assert proxy.counts["slowdown"] and proxy.counts["internal"]
    assert_same_state(final_state(faulty, s3_server[1]), final_state(clean, s3_server[1]))
