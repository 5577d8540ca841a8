"""Cluster behaviour, simulated on one machine: preemption signals, two torchrun node agents
with the latent store on S3, uneven shards, and processes that never outlive their launcher."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import defaultdict

import psutil
import pytest
import torch

from lcm_dist.latents.store import LatentStore
from lcm_dist.lifecycle import is_launcher
from lcm_dist.train.checkpoint import find_latest
from tests.helpers import (
    PYTHON,
    assert_same_state,
    final_state,
    free_port,
    launch,
    resume_config,
    run,
    run_config,
    train_more,
)


def torchrun(nproc: int, port: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] + [
        "--nnodes",
        str(nnodes),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]


def deepspeed_launcher(nproc: int, port: int) -> list[str]:
    return [PYTHON, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(nproc)] + [
        "--master_port",
        str(port),
    ]


def wait_for(condition, what: str, proc=None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended before {what}: {out[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def committed_step(run_dir) -> int:
    pointer = run_dir / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.exists() else 0


def trainers(launcher_pid: int) -> list[psutil.Process]:
    """The training processes under a launcher (not their data-loader workers, which are
    their children and run the same command)."""
    found = []
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if any(a.endswith("launch/train.py") for a in cmd) and not is_launcher(cmd):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    pids = {p.pid for p in found}
    return [p for p in found if p.ppid() not in pids]


def trace(run_dir) -> tuple[dict, dict]:
    """From ``log.trace_rows``: {epoch: every row trained in it, over all ranks (the last
    record of each step and rank counts)}, and {rank: generator checksum at the end}."""
    by_rank_step, checksums = {}, {}
    for path in sorted((run_dir / "trace").glob("rows-rank*.jsonl")):
        rank = int(path.stem.removeprefix("rows-rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "rows" in record:
                by_rank_step[(rank, record["step"])] = record
            else:
                checksums[rank] = record["generator_sha256"]
    epochs = defaultdict(list)
    for record in by_rank_step.values():
        epochs[record["epoch"]].extend(record["rows"])
    return dict(epochs), checksums


def s3_state(cfg_path, storage_options):
    from safetensors.torch import load_file

    cfg = json.loads(cfg_path.read_text())
    commit = find_latest(cfg["run_dir"])
    store = LatentStore.open(cfg["store"]["url"], storage_options=storage_options)
    store.restore_slots(commit.slots)
    rows = torch.from_numpy(store.read_rows(range(store.num_rows)))
    return load_file(str(commit.folder / "generator.safetensors")), rows


@pytest.mark.dist
@pytest.mark.slow
def test_stop_signal_on_one_process_checkpoints_every_process_and_the_rerun_is_exact(
    tmp_path, demo_shards
):
    """SLURM's --signal (SIGUSR1) reaching one process stops the whole run after its batch,
    with a commit and exit status 0; re-running continues bitwise as if never stopped."""
    reference = resume_config(tmp_path, demo_shards, "reference")
    code, out = run(reference, torchrun(2, free_port()))
    assert code == 0, out[-3000:]
    expected = final_state(reference)

    cfg = resume_config(tmp_path, demo_shards, "preempted")
    run_dir = tmp_path / "preempted" / "run"
    proc = launch(cfg, torchrun(2, free_port()))
    wait_for(lambda: committed_step(run_dir) >= 6, "the first commit", proc)
    workers = trainers(proc.pid)
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGUSR1 received; finishing this batch, then checkpointing" in out
    stopped = committed_step(run_dir)
    assert 6 <= stopped < 40
    assert f"stopped on a stop signal: checkpoint step-{stopped:08d} is committed" in out

    proc = train_more(cfg, launcher=torchrun(2, free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step-{stopped:08d} (2 -> 2 processes)" in proc.stdout + proc.stderr
    assert_same_state(expected, final_state(cfg))


@pytest.mark.dist
@pytest.mark.slow
def test_a_failure_at_an_epoch_end_on_one_process_stops_both_in_one_line(tmp_path, demo_shards):
    """The epoch's write-back fails on process 1 only: it says why, process 0 says that it
    stops too, and both end (the slot exchange that follows the write-back is a collective
    outside the agreement, so nobody waits in it)."""
    cfg = resume_config(tmp_path, demo_shards, "failing")
    code, out = run(cfg, torchrun(2, free_port()), env={"LCM_DIST_FAIL_AT": "latents.end_epoch@1"})
    assert code != 0
    assert (
        "error: writing back the latents of epoch 0 failed (no space left on device); the last "
        "checkpoint resumes" in out
    ), out[-3000:]
    assert "lcm-dist: process 0 stops too: process 1 of the run stopped while reading batch" in out


SLURM_SIGNALS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]


@pytest.mark.dist
@pytest.mark.slow
def test_slurm_warning_signal_to_every_process_of_two_agents_commits_and_resumes_exactly(
    tmp_path, demo_shards
):
    """SLURM's --signal sends SIGUSR1 to every process of the job step: both torchrun agents
    (the README's recipe makes them handle it) and their trainers. The trainers finish the
    batch and commit; re-running continues bitwise as if never stopped. (Without
    --signals-to-handle the agents die of the signal and their trainers stop uncommitted.)"""
    port = free_port()
    reference = resume_config(tmp_path, demo_shards, "reference")
    agents = [launch(reference, torchrun(1, port, 2, r) + SLURM_SIGNALS) for r in (0, 1)]
    for agent in agents:
        out, _ = agent.communicate(timeout=300)
        assert agent.returncode == 0, out[-3000:]
    expected = final_state(reference)

    cfg = resume_config(tmp_path, demo_shards, "warned")
    run_dir = tmp_path / "warned" / "run"
    port = free_port()
    agents = [launch(cfg, torchrun(1, port, 2, r) + SLURM_SIGNALS) for r in (0, 1)]
    wait_for(lambda: committed_step(run_dir) >= 6, "the first commit", agents[0])
    workers = [w for a in agents for w in trainers(a.pid)]
    assert len(workers) == 2
    for process in [*agents, *workers]:  # as SLURM does: every process at once
        os.kill(process.pid, signal.SIGUSR1)
    outs = [a.communicate(timeout=300)[0] for a in agents]
    out = "".join(outs)
    assert "SIGUSR1 received; finishing this batch, then checkpointing" in out, out[-3000:]
    assert "launcher of this process" not in out  # no trainer was orphaned
    stopped = committed_step(run_dir)
    assert 6 <= stopped < 40, out[-3000:]
    assert f"stopped on a stop signal: checkpoint step-{stopped:08d} is committed" in out

    port = free_port()
    agents = [launch(cfg, torchrun(1, port, 2, r) + SLURM_SIGNALS) for r in (0, 1)]
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outs[0][-2000:] + outs[1][-2000:]
    assert f"resuming from step-{stopped:08d} (2 -> 2 processes)" in "".join(outs)
    assert_same_state(expected, final_state(cfg))


@pytest.mark.slow
def test_sigterm_to_a_single_process_run_checkpoints_and_exits_0(tmp_path, demo_shards):
    cfg = resume_config(tmp_path, demo_shards, "single", train={"max_steps": 100000})
    run_dir = tmp_path / "single" / "run"
    proc = launch(cfg)
    wait_for(lambda: committed_step(run_dir) >= 6, "the first commit", proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out and "is committed; re-run the same command" in out
    assert "Traceback" not in out
    assert committed_step(run_dir) > 6


@pytest.mark.dist
@pytest.mark.slow
def test_two_node_agents_on_s3_train_every_row_once_and_survive_losing_a_node(
    tmp_path, demo_shards, s3_server
):
    """Two torchrun agents (--nnodes 2) of two processes each, one run folder, the latent
    store on S3. Every row is trained exactly once per epoch and the four generators agree;
    killing one node mid-run and re-launching resumes bitwise exactly."""
    prefix, options = s3_server

    def config(name):
        path = resume_config(
            tmp_path,
            demo_shards,
            name,
            train={"max_steps": 12},  # 4 steps per epoch on 4 processes: 3 epochs
            checkpoint={"every_steps": 4},
            store={"url": f"{prefix}/{name}-{uuid.uuid4().hex}/latents.zarr"},
            log={"trace_rows": True},
        )
        raw = json.loads(path.read_text())
        raw["store"]["storage_options"] = options
        path.write_text(json.dumps(raw))
        return path

    def start(cfg_path, port):
        return [launch(cfg_path, torchrun(2, port, 2, node)) for node in (0, 1)]

    def finish(agents):
        outs = [a.communicate(timeout=600)[0] for a in agents]
        return [a.returncode for a in agents], "\n".join(outs)

    clean = config("clean")
    codes, out = finish(start(clean, free_port()))
    assert codes == [0, 0], out[-4000:]
    assert "4 process(es)" in out
    epochs, checksums = trace(tmp_path / "clean" / "run")
    assert sorted(epochs) == [0, 1, 2]
    for epoch, rows in epochs.items():
        assert sorted(rows) == list(range(64)), f"epoch {epoch} did not train every row once"
    assert len(checksums) == 4 and len(set(checksums.values())) == 1, checksums

    crashed = config("crashed")
    run_dir = tmp_path / "crashed" / "run"
    agents = start(crashed, free_port())
    wait_for(lambda: committed_step(run_dir) >= 4, "the first commit", agents[0])
    os.killpg(agents[1].pid, signal.SIGKILL)  # node 1 is lost: its agent and its workers
    codes, out = finish(agents)
    assert codes[0] != 0 and committed_step(run_dir) < 12, out[-3000:]
    codes, out = finish(start(crashed, free_port()))
    assert codes == [0, 0], out[-4000:]
    assert "resuming from step-" in out and "(4 -> 4 processes)" in out
    epochs, checksums = trace(run_dir)
    for epoch, rows in epochs.items():
        assert sorted(rows) == list(range(64)), f"epoch {epoch} did not train every row once"
    assert len(set(checksums.values())) == 1
    assert_same_state(s3_state(clean, options), s3_state(crashed, options))


@pytest.mark.dist
@pytest.mark.slow
def test_three_shards_on_two_ranks_every_row_once_in_batches_of_their_share(tmp_path):
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(random_crops(24, 32, seed=3), shards, 32, 8, progress=False)
    cfg = run_config(
        tmp_path,
        shards,
        train={"max_steps": 8, "inner_steps": 1},
        log={"every_steps": 4, "image_every_steps": 0, "trace_rows": True},
    )
    code, out = run(cfg, torchrun(2, free_port()))
    assert code == 0, out[-3000:]
    epochs, checksums = trace(tmp_path / "run")
    assert sorted(epochs) == [0, 1]
    for rows in epochs.values():
        assert sorted(rows) == list(range(24))
    assert len(set(checksums.values())) == 1
    sizes = defaultdict(set)
    for path in (tmp_path / "run" / "trace").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "rows" in record:
                sizes[record["epoch"]].add(len(record["rows"]))
    # Two shards (16 images) on one rank, one (8) on the other, 4 steps each: 4 and 2.
    assert all(s == {4, 2} for s in sizes.values()), sizes


@pytest.mark.slow
def test_a_killed_run_can_be_relaunched_at_once_while_its_loader_workers_are_orphaned(
    tmp_path, demo_shards
):
    cfg = resume_config(
        tmp_path,
        demo_shards,
        "orphans",
        train={"max_steps": 100000},
        data={"num_workers": 2},
    )
    run_dir = tmp_path / "orphans" / "run"
    proc = launch(cfg)
    wait_for(lambda: committed_step(run_dir) >= 6, "the first commit", proc)
    workers = psutil.Process(proc.pid).children()
    assert workers, "the run has no loader workers"
    os.kill(proc.pid, signal.SIGKILL)  # the training process only, not its workers
    proc.wait()
    again = train_more(cfg, "train.max_steps=14")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step-" in again.stdout + again.stderr
    # The orphans died with their parent.
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


@pytest.mark.dist
@pytest.mark.slow
def test_the_deepspeed_launcher_shares_cores_and_its_workers_die_with_it(tmp_path, demo_shards):
    cfg = resume_config(tmp_path, demo_shards, "ds", train={"max_steps": 100000})
    run_dir = tmp_path / "ds" / "run"
    port = free_port()
    env = {"OMP_NUM_THREADS": ""}  # as a user's shell has it: unset
    proc = launch(cfg, deepspeed_launcher(2, port), env=env)
    wait_for(lambda: committed_step(run_dir) >= 6, "the first commit", proc)
    workers = trainers(proc.pid)
    assert len(workers) == 2
    proc.kill()  # kill -9 of the `deepspeed` command alone
    proc.wait()
    deadline = time.monotonic() + 20
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
        assert time.monotonic() < deadline, "training processes outlived their launcher"
        time.sleep(0.1)
    again = train_more(cfg, "train.max_steps=30", launcher=deepspeed_launcher(2, port), env=env)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resuming from step-" in out
    cores = len(os.sched_getaffinity(0))
    assert f"2 process(es) of {max(1, cores // 2)} thread(s)" in out
