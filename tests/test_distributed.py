"""The process-group helpers on a real two-process gloo group (no DeepSpeed)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcm_dist import distributed, lifecycle
from tests.helpers import free_port


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {}
        # Setup work that fails on one process only: both stop at once, no collective waits.
        start = time.monotonic()

        def open_store():
            if rank == 1:
                raise ValueError("cannot open the latent store at s3://x/y: refused")
            return "store"

        try:
            distributed.together("opening the latent store", open_store)
        except Exception as err:
            out["error"] = f"{type(err).__name__}: {err}"
        out["seconds"] = time.monotonic() - start
        out["max"] = distributed.max_over_ranks(torch.tensor([rank, -rank])).tolist()
        out["sum"] = distributed.sum_over_ranks(rank + 0.5)
        out["mean"] = distributed.mean_over_ranks(torch.tensor([float(rank)])).tolist()
        out["first_failed"] = distributed.first_failed_rank(rank == 1)
        out["none_failed"] = distributed.first_failed_rank(False)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_helpers_and_an_error_on_one_process_stopping_both():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert one["error"] == "ValueError: cannot open the latent store at s3://x/y: refused"
    assert zero["error"] == (
        "PeerStopped: process 1 of the run stopped while opening the latent store "
        "(its error follows)"
    )
    assert zero["seconds"] < 30  # not a collective timeout (those are minutes)
    for r in (zero, one):
        assert r["max"] == [1, 0] and r["sum"] == 2.0 and r["mean"] == [0.5]
        assert r["first_failed"] == 1 and r["none_failed"] is None


def test_single_process_helpers_are_no_ops():
    assert distributed.world_size() == 1 and distributed.first_failed_rank(True) == 0
    assert distributed.together("x", lambda: 3) == 3
    with pytest.raises(KeyError):
        distributed.together("x", lambda: {}["missing"])


def test_launcher_commands_are_recognised():
    assert lifecycle.is_launcher(["/venv/bin/python", "/venv/bin/torchrun", "--nnodes", "2"])
    assert lifecycle.is_launcher(["python", "-u", "-m", "deepspeed.launcher.launch", "x.py"])
    assert lifecycle.is_launcher(["python", "-m", "torch.distributed.run", "train.py"])
    assert lifecycle.is_launcher(["/usr/bin/python3", "/venv/bin/deepspeed", "train.py"])
    assert not lifecycle.is_launcher(["bash", "run_deepspeed.sh"])
    assert not lifecycle.is_launcher(["python", "-m", "pytest", "-k", "torchrun"])
    assert not lifecycle.is_launcher(["/home/deepspeed/.venv/bin/python", "launch/train.py"])


def test_each_process_binds_its_own_gpu_or_the_only_one_it_sees():
    # Every GPU of the node visible: the process's LOCAL_RANK.
    assert [distributed.cuda_device_index(r, 8) for r in range(8)] == list(range(8))
    # One GPU per process (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES per process): cuda:0,
    # whatever the LOCAL_RANK (DeepSpeed alone would ask for cuda:3 here).
    assert [distributed.cuda_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    # Neither: an error that says what the process sees.
    with pytest.raises(
        ValueError, match=r"LOCAL_RANK 5 but sees only 4 GPUs \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"
    ):
        distributed.cuda_device_index(5, 4, "0,1,2,3")
    with pytest.raises(RuntimeError, match="sees no GPU"):
        distributed.cuda_device_index(0, 0)


def test_deepspeed_is_told_the_bound_gpu(monkeypatch):
    assert distributed.engine_args() is None  # on a CPU DeepSpeed binds nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device() == torch.device("cuda", 0)
    assert distributed.engine_args().device_rank == 0


def test_a_filesystem_without_record_locks_is_named_not_blamed_on_another_process(
    tmp_path, monkeypatch
):
    import errno
    import fcntl

    from lcm_dist.lifecycle import RunLockedError, lock_run_dir

    def no_locks(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(RunLockedError) as caught:
        lock_run_dir(str(tmp_path / "run"))
    message = str(caught.value)
    assert message.startswith(f"cannot lock {tmp_path / 'run' / '.lock'} (No locks available)")
    assert "lack POSIX record locks" in message and "another" not in message

    def held(handle, flags):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "lockf", held)
    with pytest.raises(RunLockedError, match="another training process is using"):
        lock_run_dir(str(tmp_path / "run"))
