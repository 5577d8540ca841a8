"""Checkpoints: everything a run needs to continue, committed atomically.

    <run_dir>/checkpoints/step-00000100/
        mp_rank_00_model_states.pt ...   the DeepSpeed engine: generator and optimizer state
        generator.safetensors            the generator's full fp32 weights (export, checks)
        slots.npy                        the latent store's slot table at this commit
        rng-rank<r>.pt                   each process's torch RNG state and BatchNorm statistics
        state.json                       step, data position, world size, model config
    <run_dir>/latest.json                the commit point

A checkpoint is committed by one atomic rename of ``latest.json``, which names the checkpoint
folder and lists every file in it with its size and SHA-256. Until that rename the previous
commit stays the current one; a crash at any instant leaves either the old or the new commit,
never a mix. The latent store's rows of a commit are the slots its ``slots.npy`` points at:
writes after the commit go to the other slot of each chunk (``lcm_dist.latents.store``), so
they never leak into a resumed run.

Only the newest commit is resumable: older checkpoint folders keep the generator, but the
store's slots they point at may since have been reused. A corrupt newest checkpoint is therefore
an error that says so, never a silent fallback or a fresh start.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lcm_dist import distributed
from lcm_dist.commits import (  # noqa: F401 (the commit point, also reached from here)
    FOLDER,
    FORMAT,
    POINTER,
    VERSION,
    CheckpointError,
    Commit,
    committed_tag,
    file_sha256,
    files_of_rank,
    find_latest,
    fsync_dir,
    tag_for,
    write_json_durably,
)
from lcm_dist.faults import crash_point, fail_point


def _fp32_masters(engine) -> dict[int, torch.Tensor]:
    """Under bf16, the optimizer's fp32 master copy of each generator parameter (by id),
    whole (gathered under ZeRO); the module itself holds only bf16 roundings of them."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(engine.module.parameters())
    masters = {id(p): safe_get_full_fp32_param(p) for p in params}
    if any(m is None for m in masters.values()):
        # ZeRO stage 0 under bf16 keeps unflattened fp32 copies beside the bf16 groups.
        opt = engine.optimizer
        pairs = zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []), strict=True)
        masters = {id(lo): hi for los, his in pairs for lo, hi in zip(los, his, strict=True)}
    missing = [p for p in params if masters.get(id(p)) is None]
    if missing:
        raise CheckpointError(
            f"cannot find the fp32 master weights of the generator in DeepSpeed's "
            f"{type(engine.optimizer).__name__}; train in fp32 or with ZeRO stage 1-2"
        )
    return masters


def _set_fp32_masters(engine, weights: dict[str, torch.Tensor]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    masters = None
    for name, param in engine.module.named_parameters():
        value = weights[name].to(param.device)
        if safe_get_full_fp32_param(param) is not None:
            safe_set_full_fp32_param(param, value)
        else:
            masters = masters or _fp32_masters(engine)
            masters[id(param)].data.copy_(value.view_as(masters[id(param)]))


def generator_state(engine) -> dict[str, torch.Tensor]:
    """The generator's full weights as contiguous CPU fp32 tensors: under bf16 the
    optimizer's fp32 masters, never an upcast of the bf16 copy (ZeRO 1-2 gather them on every
    rank). Integer buffers (BatchNorm's batch counters) keep their dtype."""
    state = engine.module.state_dict()
    if engine.bfloat16_enabled():
        masters = _fp32_masters(engine)
        by_name = {name: masters[id(p)] for name, p in engine.module.named_parameters()}
        state = {name: by_name.get(name, tensor) for name, tensor in state.items()}
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state.items()
    }


def _floating_buffers(engine) -> dict[str, torch.Tensor]:
    return {n: b for n, b in engine.module.named_buffers() if b.is_floating_point()}


def _averaged_buffers(engine) -> dict[str, torch.Tensor]:
    """BatchNorm's running statistics averaged over the processes, as fp32 CPU copies (each
    process keeps its own from its own batches: DeepSpeed averages gradients, not buffers).
    A collective."""
    buffers = {n: b.detach().float().clone() for n, b in _floating_buffers(engine).items()}
    distributed.average_(list(buffers.values()))
    return {n: b.cpu().contiguous() for n, b in buffers.items()}


def save(engine, run_dir: str | os.PathLike, step: int, state: dict, slots) -> str:
    """Write a checkpoint of ``step`` and commit it; every process calls this together.

    ``state`` is the trainer's JSON-ready position; ``slots`` the store's slot table with every
    process's writes merged (or None without a store). Returns the tag."""
    from safetensors.torch import save_file

    run = Path(run_dir)
    tag = tag_for(step)
    folder = run / FOLDER / tag
    rank = distributed.rank()
    main = distributed.is_main()

    def clear():
        if main and folder.exists():
            shutil.rmtree(folder)  # left by an attempt that crashed before committing

    def write_own():
        fail_point("checkpoint.write")
        crash_point("checkpoint.write")
        own = {n: b.detach().cpu() for n, b in _floating_buffers(engine).items()}
        torch.save({"torch": torch.get_rng_state(), "buffers": own}, folder / f"rng-rank{rank}.pt")
        if main:
            save_file(weights, str(folder / "generator.safetensors"))
            if slots is not None:
                np.save(folder / "slots.npy", np.asarray(slots, dtype=np.int8))
            write_json_durably(
                folder / "state.json", {"format": FORMAT, "version": VERSION, **state}
            )

    def commit():
        if not main:
            return
        files = {
            str(p.relative_to(folder)): [p.stat().st_size, file_sha256(p)]
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        tmp = run / (POINTER + ".tmp")
        write_json_durably(tmp, {"tag": tag, "step": step, "files": files})
        crash_point("checkpoint.before_commit")
        fail_point("checkpoint.commit")
        os.replace(tmp, run / POINTER)  # the commit
        try:
            fsync_dir(run)
        except OSError as err:  # committed, but perhaps not durable: not the generic message
            raise CheckpointError(
                f"checkpoint {folder} was committed in {run / POINTER}, but syncing "
                f"{run} failed ({err}); after a power cut the previous commit may be the one "
                "that resumes"
            ) from None
        crash_point("checkpoint.after_commit")

    # Each process's own writes end in an agreement rather than a barrier: a process whose
    # write fails (a full disk) raises its error, and the others stop at once with one line
    # naming it instead of waiting at the barrier (under NCCL, until its timeout).
    try:
        distributed.together(f"clearing checkpoint {tag}", clear)
        weights = generator_state(engine)
        # The weights for export get the statistics of all processes; each process's own
        # go to its rank file, so that a resumed run continues exactly where it stopped.
        averaged = _averaged_buffers(engine)
        if weights:
            weights.update(averaged)
        engine.save_checkpoint(str(run / FOLDER), tag=tag, save_latest=False)
        distributed.together(f"writing checkpoint {tag}", write_own)
        distributed.together(f"committing checkpoint {tag}", commit)
    except OSError as err:
        raise CheckpointError(
            f"writing checkpoint {folder} failed ({err}); the previous commit in "
            f"{run / POINTER} is untouched and resumes"
        ) from None
    return tag


def commit_copy(commit: Commit, run_dir: str | os.PathLike, state: dict, slots) -> str:
    """Commit, as ``run_dir``'s first checkpoint, a copy of ``commit``'s files with a new
    ``state`` and slot table (a grown run starts from its parent's newest commit). Returns the
    tag. One process writes it."""
    run = Path(run_dir)
    folder = run / FOLDER / commit.tag
    if folder.exists():
        shutil.rmtree(folder)  # left by an attempt that crashed before committing
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(commit.folder, folder)
    np.save(folder / "slots.npy", np.asarray(slots, dtype=np.int8))
    write_json_durably(folder / "state.json", {"format": FORMAT, "version": VERSION, **state})
    files = {
        str(p.relative_to(folder)): [p.stat().st_size, file_sha256(p)]
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    tmp = run / (POINTER + ".tmp")
    write_json_durably(tmp, {"tag": commit.tag, "step": state["step"], "files": files})
    os.replace(tmp, run / POINTER)
    fsync_dir(run)
    return commit.tag


def prune(run_dir: str | os.PathLike, keep_latest: int) -> None:
    """Delete checkpoint folders beyond the newest ``keep_latest`` (never the committed one)."""
    run = Path(run_dir)
    committed = committed_tag(run)
    folders = sorted(p for p in (run / FOLDER).glob("step-*") if p.is_dir())
    newest_first = [p for p in reversed(folders) if p.name <= (committed or "")]
    for old in newest_first[keep_latest:]:
        if old.name != committed:
            shutil.rmtree(old, ignore_errors=True)


def load_engine(engine, commit: Commit, same_world: bool) -> bool:
    """Load the generator and, when the world size is unchanged (or under ZeRO stage 0, whose
    optimizer state is not partitioned), the optimizer state. Returns whether the optimizer
    state was restored. The loaded weights are checked against ``generator.safetensors``.
    BatchNorm's running statistics come back per process with the same world size, else as
    the processes' average."""
    from safetensors.torch import load_file

    with_optimizer = same_world or engine.zero_optimization_stage() == 0
    path, _ = engine.load_checkpoint(
        str(commit.folder.parent),
        tag=commit.tag,
        load_optimizer_states=with_optimizer,
        load_lr_scheduler_states=with_optimizer,
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state in {commit.folder}")
    expected = load_file(str(commit.folder / "generator.safetensors"))
    if engine.bfloat16_enabled() and not with_optimizer:
        # Without its optimizer state DeepSpeed rebuilds the fp32 masters from the bf16
        # weights; the checkpoint's fp32 weights are the exact ones.
        _set_fp32_masters(engine, expected)
    parameters = {name for name, _ in engine.module.named_parameters()}
    loaded = generator_state(engine)
    for name, tensor in loaded.items():
        if name in parameters and not torch.equal(tensor, expected[name]):
            raise CheckpointError(
                f"generator weight {name} loaded from {commit.folder} differs from its "
                "generator.safetensors; the checkpoint is inconsistent"
            )
    buffers = expected
    if same_world:
        mine = torch.load(commit.folder / f"rng-rank{distributed.rank()}.pt", weights_only=True)
        buffers = {**expected, **mine.get("buffers", {})}
    with torch.no_grad():
        for name, buffer in _floating_buffers(engine).items():
            buffer.copy_(buffers[name])
    return with_optimizer


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, reading back with ``weights_only=True``: a
    checkpoint file can hold tensors and plain containers, and only the two DeepSpeed classes
    its ZeRO optimizer state needs, never arbitrary pickled code."""

    def __new__(cls, config_params):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, ZeroStageEnum, fragment_address]

        class _Engine(TorchCheckpointEngine):
            def load(self, path: str, map_location=None):
                try:
                    with torch.serialization.safe_globals(allowed):
                        return torch.load(path, map_location=map_location, weights_only=True)
                except Exception as err:
                    found = re.search(r"GLOBAL ([\w.]+)", str(err))
                    reason = (
                        f"it holds an object of type {found.group(1)}, which is not loaded "
                        "(only tensors and plain data are)"
                        if found
                        else str(err).strip().splitlines()[0]
                    )
                    raise CheckpointError(f"cannot read checkpoint file {path}: {reason}") from None

        return _Engine(config_params)
