"""A run's parts, built once and in order from its config: the data plan, the latent table,
the models and the DeepSpeed engine. (What runs every batch is in ``lcm_dist.train.batches``;
what a checkpoint records and a resume reads back, part by part, in ``lcm_dist.train.resume``.)

Every process calls these together: the steps that can fail on one process alone (reading the
shards' manifest, opening the store, reading the checkpoint) run under
``distributed.together``, so a failure anywhere stops every process at once.
"""

from __future__ import annotations

import os

import torch

from lcm_dist import distributed, lifecycle
from lcm_dist.config import RunConfig
from lcm_dist.data.shards import load_manifest
from lcm_dist.latents.cache import WriteBackCache
from lcm_dist.latents.io_threads import IO_NICENESS
from lcm_dist.latents.layout import min_cache_bytes
from lcm_dist.latents.run_store import open_run_store
from lcm_dist.latents.table import InMemoryLatentTable
from lcm_dist.model.latent_net import initial_phi
from lcm_dist.train import checkpoint
from lcm_dist.train.resume import RunState

BUCKET_ELEMENTS = 10_000_000
"""ZeRO's gradient and all-gather bucket size, in elements, unless the config sets one."""


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed section as given, with the batch size filled in from ``data.batch_size``."""
    ds = dict(cfg.deepspeed)
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    ds.setdefault("gradient_accumulation_steps", 1)
    # DeepSpeed prints a line every steps_per_print optimizer steps; the run has its own logs.
    ds.setdefault("steps_per_print", 2**31 - 1)
    # No gradient clipping unless the config asks for it (the model is trained without it):
    # DeepSpeed's own default (1.0 in current releases, 0 in older ones) would clip silently,
    # and costs a gradient-norm pass over every parameter each step.
    ds.setdefault("gradient_clipping", 0.0)
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", 0) >= 1:
        if "zero_allow_untested_optimizer" not in ds:
            # ZeRO refuses optimizers it has not been tested with (plain SGD among them).
            ds["zero_allow_untested_optimizer"] = True
        # DeepSpeed's default buckets (5e8 elements, sized for language models) hold the whole
        # 38.7M-parameter paper generator in one bucket: nothing is reduced before the backward
        # pass ends, so no reduction overlaps it, and the buffers take ~4 GB. A bucket of
        # BUCKET_ELEMENTS splits the paper generator's gradients into about four, reduced as the
        # backward pass produces them. (On a CPU the large buckets also fault in gigabytes of
        # fresh pages every step: 3.4 s per demo step instead of 0.17 s.)
        zero.setdefault("reduce_bucket_size", BUCKET_ELEMENTS)
        zero.setdefault("allgather_bucket_size", BUCKET_ELEMENTS)
        offload = zero.get("offload_optimizer") or {}
        if not ds["gradient_clipping"] and offload.get("device", "none") in ("none", None):
            # Without clipping the global gradient norm is only logged by DeepSpeed: a norm pass
            # over every gradient, an all-reduce and a host sync per inner step, for nothing.
            zero.setdefault("compute_grad_norm", False)
        if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled"):
            # DeepSpeed's bf16 overflow check all-reduces a flag and reads it on the host every
            # inner step, and on an overflow skips theta's step while phi is stepped. Without it
            # theta always steps with phi: a non-finite gradient makes the next loss
            # non-finite, which the batch's own check turns into a stop before any commit.
            ds["bf16"] = {"check_grad_overflow": False, **ds["bf16"]}
        ds["zero_optimization"] = zero
    return ds


def set_threads() -> None:
    """Share the node's cores between its processes under every launcher (the deepspeed
    launcher sets no OMP_NUM_THREADS, so each process would take every core); an
    OMP_NUM_THREADS in the environment wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // distributed.local_world_size()))


def open_latents(
    cfg: RunConfig, manifest: dict, commit: checkpoint.Commit | None = None
) -> WriteBackCache | InMemoryLatentTable:
    """The run's phi rows: the Zarr store (rank 0 creates it for a new run) behind a write-back
    cache, set to the slots of ``commit`` when resuming; or, with ``store.in_ram``, a table in
    this process's memory. Every process calls this together; an error on any stops all."""
    if cfg.store.in_ram:
        if distributed.world_size() > 1:
            raise ValueError(
                "store.in_ram keeps latents private to one process; with several processes use "
                "the Zarr store (set store.in_ram to false)"
            )
        if commit is not None:
            raise checkpoint.CheckpointError(
                f"the run in {cfg.run_dir} kept its latents in RAM (store.in_ram), so they were "
                "not saved and it cannot be resumed; start a new run_dir"
            )
        return InMemoryLatentTable(manifest["num_samples"], initial_phi(cfg.model))
    main = distributed.is_main()
    # Rank 0 creates the store of a new run before the others open it.
    store = distributed.together(
        "opening the latent store",
        lambda: open_run_store(cfg, manifest, create=commit is None) if main else None,
    )
    if not main:
        store = distributed.together(
            "opening the latent store", lambda: open_run_store(cfg, manifest, create=False)
        )
    else:
        distributed.together("opening the latent store", lambda: None)
    return distributed.together(
        "setting up the latent cache", lambda: _latent_cache(cfg, store, commit)
    )


def _latent_cache(cfg: RunConfig, store, commit: checkpoint.Commit | None) -> WriteBackCache:
    if commit is not None:
        store.restore_slots(commit.slots)
    elif (store.committed >= 0).any():
        # A new run may reuse a store only if nothing was ever committed to it (e.g. the same
        # command crashed before its first checkpoint).
        raise ValueError(
            f"the latent store {store.url} holds latents committed by another run, and "
            f"{cfg.run_dir} has no checkpoint of it; point store.url elsewhere or delete it"
        )
    rows = store.rows_per_chunk
    chunks, min_budget = min_cache_bytes(cfg.data, rows, store.phi_size)
    if cfg.store.cache_bytes < min_budget:
        raise ValueError(
            f"store.cache_bytes ({cfg.store.cache_bytes}) is below the {min_budget} bytes that "
            f"the {chunks} chunks of {rows} rows one batch may touch need; raise it"
        )
    return WriteBackCache(
        store,
        cfg.store.cache_bytes,
        cfg.store.io_threads,
        cfg.store.prefetch_chunks,
        # When the CPU computes the step, the I/O threads give way to it.
        io_niceness=IO_NICENESS if distributed.device().type == "cpu" else 0,
    )


def my_checkpoint_files(names: list[str]) -> list[str]:
    """The checkpoint files this process verifies on resume: each file is hashed by one
    process (``checkpoint.files_of_rank``), and the agreement after ``prepare`` stops every
    process if any found a bad one."""
    return checkpoint.files_of_rank(names, distributed.rank(), distributed.world_size())


def prepare(cfg: RunConfig) -> tuple[dict, object, checkpoint.Commit | None, RunState]:
    """Checks that need no other process: the shards, the held-back images, the run lock (rank
    0), the newest commit and that the run's parts can continue from it. Returns (manifest,
    lock, commit, the registry of the run's stateful parts)."""
    manifest = load_manifest(cfg.data.shards)
    if manifest["image_size"] != cfg.model.image_size:
        raise ValueError(
            f"shards in {cfg.data.shards} hold {manifest['image_size']}px images but "
            f"model.image_size is {cfg.model.image_size}; remake the shards or change the model"
        )
    if cfg.log.restore_every_steps:
        from lcm_dist.files import collect_sources

        collect_sources([cfg.log.restore_images])  # a bad path fails before anything is written
    lock = lifecycle.lock_run_dir(cfg.run_dir) if distributed.is_main() else None
    commit = checkpoint.find_latest(cfg.run_dir, verify=my_checkpoint_files)
    run_state = RunState(cfg, manifest["num_samples"])
    if commit is not None:
        run_state.check(commit)
    return manifest, lock, commit, run_state


def skip_lone_allreduce(engine) -> None:
    """In a single process without ZeRO, DeepSpeed's gradient all-reduce is an identity that
    still flattens every gradient into a bucket, reduces it and copies it back each step:
    turn it off (DeepSpeed does the same when it has no communication backend). Under ZeRO
    the reduction also partitions the gradients for the optimizer, so it stays."""
    if distributed.world_size() == 1 and not engine.zero_optimization():
        engine.enable_backward_allreduce = False
