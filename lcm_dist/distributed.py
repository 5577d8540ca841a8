"""Process-group plumbing, in one place. Every helper is a no-op in a single process.

Training runs the same under the ``deepspeed`` launcher, under ``torchrun`` and as plain
``python launch/train.py``; for the last, the environment a launcher would set is filled in for
a world of one, so DeepSpeed neither looks for MPI nor needs a free port chosen by hand.

Collectives run on the device the backend serves: NCCL reduces CUDA tensors only, gloo CPU
tensors, so the helpers move their (tiny) operands there and back. On a GPU node each process
binds its CUDA device before the process group exists, so NCCL's communicator and every later
allocation land on that device and not all on GPU 0: GPU ``LOCAL_RANK`` where the process sees
the node's GPUs, GPU 0 where it sees only its own (SLURM's ``--gpus-per-task=1``, or
``CUDA_VISIBLE_DEVICES`` set per process). The process group is created here with that device,
and DeepSpeed is told it, since both would otherwise take ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class PeerStopped(RuntimeError):
    """Another process of the run stopped on an error (which it reports itself, last)."""


class PortInUseError(ValueError):
    """The rendezvous port of the run is taken."""


_verbose = False


def set_verbose(verbose: bool) -> None:
    """Show DeepSpeed's INFO and WARNING lines and torch.distributed's warnings (off unless
    asked for: they bury the run's own lines). Call before ``init_distributed``."""
    global _verbose
    _verbose = verbose


def _quiet_libraries() -> None:
    """DeepSpeed's logger (its level is set when deepspeed is imported) at ERROR and the Python
    warnings of torch.distributed and DeepSpeed off; with ``set_verbose(True)`` the logger at
    INFO. A ``log_level`` in the DeepSpeed config still applies from ``deepspeed.initialize``."""
    from deepspeed.utils.logging import set_log_level_from_string

    set_log_level_from_string("info" if _verbose else "error")  # the logger and its handlers
    if _verbose:
        return
    for module in (r"torch\.distributed", r"deepspeed"):
        warnings.filterwarnings("ignore", module=module)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join (or create) the process group through DeepSpeed: NCCL on CUDA, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device())
    import deepspeed

    _quiet_libraries()
    if not cuda:
        # The shared-memory comm op is JIT-compiled on first use (minutes); gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    try:
        if cuda:
            # NCCL's communicator on this process's own GPU (DeepSpeed would name
            # cuda:LOCAL_RANK); DeepSpeed then adopts the group. A world of one names no device
            # (as DeepSpeed does: binding one makes torch split communicators it cannot reach).
            from deepspeed.constants import default_pg_timeout

            dist.init_process_group(
                "nccl",
                timeout=default_pg_timeout,
                device_id=device() if int(os.environ["WORLD_SIZE"]) > 1 else None,
            )
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False
        )
    except RuntimeError as err:  # torch's DistNetworkError is a RuntimeError
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err):
            raise
        port, addr = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
        raise PortInUseError(
            f"port {port} on {addr} (MASTER_PORT), where the run's processes meet, is in use: "
            "processes of an earlier launch may still be stopping (they exit within seconds of "
            "their launcher) or another job holds it; re-run in a moment, or give the launcher "
            "another port (--master_port)"
        ) from None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes of this run on this node: torchrun sets LOCAL_WORLD_SIZE, the deepspeed
    launcher LOCAL_SIZE; a plain ``python`` run is one."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return max(1, int(os.environ[name]))
    return 1


def is_main() -> bool:
    return rank() == 0


def cuda_device_index(local: int, visible: int, visible_names: str | None = None) -> int:
    """The index, among the ``visible`` GPUs this process sees, of the one it computes on:
    ``local`` (its LOCAL_RANK) where it sees the node's GPUs, 0 where it sees only one (each
    process given its own GPU). Anything else is ambiguous and an error."""
    if visible < 1:
        raise RuntimeError("this process sees no GPU")
    if visible == 1:
        return 0
    if local < visible:
        return local
    names = f" (CUDA_VISIBLE_DEVICES={visible_names})" if visible_names is not None else ""
    raise ValueError(
        f"this process has LOCAL_RANK {local} but sees only {visible} GPUs{names}; let every "
        "process see all of its node's GPUs, or exactly one (one GPU per process)"
    )


def device() -> torch.device:
    """This process's compute device: its GPU (``cuda_device_index``) or the CPU."""
    if torch.cuda.is_available():
        index = cuda_device_index(
            local_rank(), torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        return torch.device("cuda", index)
    return torch.device("cpu")


def engine_args():
    """The ``args`` for ``deepspeed.initialize``: on a GPU, the device this process bound
    (DeepSpeed's ``device_rank``; without it DeepSpeed binds cuda:LOCAL_RANK); else None."""
    if not torch.cuda.is_available():
        return None
    from types import SimpleNamespace

    return SimpleNamespace(device_rank=device().index)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    """A reduced copy of ``values`` (on the device it came from)."""
    if world_size() == 1:
        return values.detach().clone()
    t = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(t, op=op)
    return t.to(values.device)


def barrier() -> None:
    if world_size() > 1:
        # A one-element all-reduce instead of dist.barrier(): under NCCL a barrier guesses the
        # device from the rank, which is wrong whenever LOCAL_RANK is not the global rank.
        _all_reduce(torch.zeros(1), dist.ReduceOp.SUM)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor of metrics across ranks (for logging only)."""
    return _all_reduce(values, dist.ReduceOp.SUM) / world_size()


def sum_over_ranks(value: float) -> float:
    """Sum a scalar across ranks (for logging only)."""
    return float(_all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.SUM))


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of a tensor over all processes (a copy; itself in one process)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over all processes (no-op in one)."""
    if world_size() == 1:
        return
    for t in tensors:
        t.copy_(_all_reduce(t, dist.ReduceOp.SUM) / world_size())


def first_failed_rank(failed: bool) -> int | None:
    """The lowest rank for which ``failed`` is true, agreed by all ranks (a collective)."""
    me = torch.tensor([rank() if failed else world_size()], dtype=torch.int64)
    lowest = int(_all_reduce(me, dist.ReduceOp.MIN))
    return None if lowest >= world_size() else lowest


def together(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, every rank stops at once: the
    failing ones with their own error, the others with a one-line PeerStopped naming the
    failing rank. Without this, ranks that succeeded would wait at their next collective until
    it timed out (minutes under NCCL). ``fn`` must not itself run collectives."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as err:
        error = err
    failed = first_failed_rank(error is not None) if world_size() > 1 else None
    if error is not None:
        raise error
    if failed is not None:
        raise PeerStopped(f"process {failed} of the run stopped while {what} (its error follows)")
    return result  # type: ignore[return-value]


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
