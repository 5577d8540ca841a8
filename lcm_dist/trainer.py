"""The training loop: per-image latent nets and the shared generator, trained jointly.

One batch of B images: read their phi rows from the latent table as a (B, P) tensor, then run
``train.inner_steps`` joint SGD updates. Each update evaluates all B latent nets at once, runs
the generator under DeepSpeed, computes Lap-L1 + MSE, and does one backward pass that gives
gradients for theta (averaged across ranks by DeepSpeed) and for phi (local: phi never enters
the engine). phi is then stepped by plain SGD and its conv weights clamped. The updated rows go
back to the write-back cache. Every ``checkpoint.every_steps`` batches and at the end, the run
commits a checkpoint (``lcm_dist.checkpoint``); re-running the same command continues from the
newest commit.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from lcm_dist import checkpoint, distributed, lifecycle
from lcm_dist.cache import WriteBackCache
from lcm_dist.config import RunConfig, bottleneck_side, config_to_dict, write_resolved_config
from lcm_dist.data import ShardLoader, chunk_need_order
from lcm_dist.generator import Generator, count_parameters
from lcm_dist.latent_net import BatchedLatentNet, clamp_phi_, initial_phi, phi_layout
from lcm_dist.latent_store import open_run_store, resolve_url
from lcm_dist.latent_table import InMemoryLatentTable
from lcm_dist.loss import lcm_loss
from lcm_dist.metrics import NullLogger, RowTrace, RunLogger, image_grid
from lcm_dist.restore import inpainting_preview
from lcm_dist.shards import load_manifest


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished run reports back (used by the demo, tests and benchmarks)."""

    steps: int
    first_loss: float
    last_loss: float
    images_per_second: float
    step_seconds: list[float]  # wall time of every step, data loading included
    epoch_io: list[dict]  # latent store counters at each epoch's end and at the run's end


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed section as given, with the batch size filled in from ``data.batch_size``."""
    ds = dict(cfg.deepspeed)
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    ds.setdefault("gradient_accumulation_steps", 1)
    # DeepSpeed prints a line every steps_per_print optimizer steps; the run has its own logs.
    ds.setdefault("steps_per_print", 2**31 - 1)
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", 0) >= 1:
        if "zero_allow_untested_optimizer" not in ds:
            # ZeRO refuses optimizers it has not been tested with (plain SGD among them).
            ds["zero_allow_untested_optimizer"] = True
        if not torch.cuda.is_available():
            # DeepSpeed's default buckets (5e8 elements, sized for GPUs) make every ZeRO step
            # on a CPU fault in gigabytes of fresh pages: 3.4 s per demo step instead of 0.17 s.
            zero.setdefault("reduce_bucket_size", 5_000_000)
            zero.setdefault("allgather_bucket_size", 5_000_000)
            ds["zero_optimization"] = zero
    return ds


def _set_threads() -> None:
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
    # A batch draws from each loader worker's shuffle window of consecutive rows, so it touches
    # at most this many chunks (and never more than one per image).
    d, rows = cfg.data, store.rows_per_chunk
    window_chunks = -(-(d.shuffle_buffer + d.batch_size) // rows) + 1
    chunks = min(d.batch_size, max(1, d.num_workers) * window_chunks)
    min_budget = chunks * rows * store.phi_size * 4
    if cfg.store.cache_bytes < min_budget:
        raise ValueError(
            f"store.cache_bytes ({cfg.store.cache_bytes}) is below the {min_budget} bytes that "
            f"the {chunks} chunks of {rows} rows one batch may touch need; raise it"
        )
    return WriteBackCache(
        store, cfg.store.cache_bytes, cfg.store.io_threads, cfg.store.prefetch_chunks
    )


def _chunk_order(cfg: RunConfig, loader: ShardLoader, latents, epoch: int) -> list[int]:
    if isinstance(latents, InMemoryLatentTable):
        return []
    shard_ids, _ = loader.plan(epoch)
    return chunk_need_order(
        loader.manifest, shard_ids, cfg.data.num_workers, latents.rows_per_chunk
    )


def _share_latent_slots(latents) -> None:
    """Tell every process where the others wrote their chunks. Every process has finished its
    writes before this (flush) and the exchange is a collective, so the next reads see every
    chunk's newest data. Nothing is committed here: only a checkpoint commits."""
    changes = latents.changes()
    if distributed.world_size() > 1:
        # Each chunk was written by at most one process: -2 marks "not mine", MAX merges.
        table = torch.full((latents.store.num_chunks,), -2, dtype=torch.int32)
        for chunk, slot in changes.items():
            table[chunk] = slot
        table = distributed.max_over_ranks(table)
        changes = {int(c): int(table[c]) for c in torch.nonzero(table > -2).flatten()}
    latents.apply_changes(changes)


# What decides the order in which an epoch deals its images: a resumed run whose values differ
# from the checkpoint's cannot continue the interrupted epoch where it stopped.
_PLAN_KEYS = {
    "world_size": "processes",
    "num_workers": "data.num_workers",
    "batch_size": "data.batch_size",
    "seed": "train.seed",
    "shuffle_buffer": "data.shuffle_buffer",
}


def _data_plan(cfg: RunConfig) -> dict:
    return {
        "world_size": distributed.world_size(),
        "num_workers": cfg.data.num_workers,
        "batch_size": cfg.data.batch_size,
        "seed": cfg.train.seed,
        "shuffle_buffer": cfg.data.shuffle_buffer,
    }


def _checkpoint(
    cfg: RunConfig, engine, latents, step: int, position: tuple[int, int], num_images: int
) -> None:
    """Flush the latents, save everything and commit it; then the store's committed slots
    follow the checkpoint's."""
    latents.flush()
    _share_latent_slots(latents)
    slots = latents.store.live if isinstance(latents, WriteBackCache) else None
    state = {
        "step": step,
        "epoch": position[0],
        "batch_in_epoch": position[1],
        **_data_plan(cfg),
        "model": config_to_dict(cfg)["model"],
        "loss": {"levels": cfg.train.lap_levels, "mse_weight": cfg.train.mse_weight},
        "num_images": num_images,
        "shards": cfg.data.shards,
        "store_url": None if cfg.store.in_ram else resolve_url(cfg),
    }
    checkpoint.save(engine, cfg.run_dir, step, state, slots)
    latents.commit(persist=distributed.is_main())
    if distributed.is_main():
        checkpoint.prune(cfg.run_dir, cfg.checkpoint.keep_latest)


def _check_commit_matches(cfg: RunConfig, commit: checkpoint.Commit, num_images: int) -> None:
    ours, theirs = config_to_dict(cfg)["model"], commit.state["model"]
    if ours != theirs:
        diff = ", ".join(
            f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        )
        raise checkpoint.CheckpointError(
            f"the config's model differs from the one checkpointed in {commit.folder} ({diff}); "
            "resume with the run's own model config, or use a new run_dir"
        )
    url = None if cfg.store.in_ram else resolve_url(cfg)
    if commit.state["store_url"] != url:
        raise checkpoint.CheckpointError(
            f"the run in {cfg.run_dir} keeps its latents in {commit.state['store_url']}, but the "
            f"config says {url}; resume with the run's own store settings"
        )
    trained_on = commit.state.get("num_images")
    if trained_on is not None and trained_on != num_images:
        raise checkpoint.CheckpointError(
            f"the shards in {cfg.data.shards} hold {num_images} images but the run in "
            f"{cfg.run_dir} was checkpointed on {trained_on}; resume with the run's own shards, "
            "or start a new run_dir"
        )


def _prepare(cfg: RunConfig) -> tuple[dict, object, checkpoint.Commit | None]:
    """Checks that need no other process: the shards, the held-back images, the run lock (rank
    0) and the newest commit. Returns (manifest, lock, commit)."""
    manifest = load_manifest(cfg.data.shards)
    if manifest["image_size"] != cfg.model.image_size:
        raise ValueError(
            f"shards in {cfg.data.shards} hold {manifest['image_size']}px images but "
            f"model.image_size is {cfg.model.image_size}; remake the shards or change the model"
        )
    if cfg.log.restore_every_steps:
        from lcm_dist.shards import collect_sources

        collect_sources([cfg.log.restore_images])  # a bad path fails before anything is written
    lock = lifecycle.lock_run_dir(cfg.run_dir) if distributed.is_main() else None
    commit = checkpoint.find_latest(cfg.run_dir)
    if commit is not None:
        _check_commit_matches(cfg, commit, manifest["num_samples"])
    return manifest, lock, commit


def _start_position(cfg: RunConfig, engine, commit: checkpoint.Commit | None):
    """(first step, epoch, batch in epoch, note for the log) of a new or resumed run; loads
    the engine and this process's RNG state from ``commit``."""
    if commit is None:
        return 1, 0, 0, ""
    world = distributed.world_size()
    same_world = commit.state["world_size"] == world
    if not same_world and engine.zero_optimization_stage() == 3:
        raise checkpoint.CheckpointError(
            f"the run in {cfg.run_dir} was checkpointed by {commit.state['world_size']} "
            f"processes under ZeRO stage 3, which partitions the weights per process; resume "
            f"it with {commit.state['world_size']} processes (stages 0-2 resume with any number)"
        )
    with_optimizer = checkpoint.load_engine(engine, commit, same_world)
    epoch, batch = commit.state["epoch"], commit.state["batch_in_epoch"]
    plan = _data_plan(cfg)
    changed = [
        name for key, name in _PLAN_KEYS.items() if commit.state.get(key, plan[key]) != plan[key]
    ]
    restarted = ""
    if not changed:
        rng = torch.load(commit.folder / f"rng-rank{distributed.rank()}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
    elif batch:
        # The interrupted epoch's remaining images cannot be told apart under another plan:
        # the epoch starts again (its images seen so far are trained once more).
        restarted = f", epoch {epoch} restarted ({', '.join(changed)} changed)"
        batch = 0
    note = (
        f"; resuming from {commit.tag} ({commit.state['world_size']} -> {world} processes"
        + ("" if with_optimizer else ", optimizer state reset")
        + restarted
        + ")"
    )
    return commit.state["step"] + 1, epoch, batch, note


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host: via pinned memory on a GPU."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _next_batch(batches, latents, loader, cfg, epoch):
    """The next batch and its phi rows (host memory); a new epoch first writes back and shares
    the last one's latents. Returns (batch, phi, io stats at the epoch's end or None)."""
    batch = next(batches)
    ended = None
    if batch.epoch != epoch:
        if epoch is not None:
            latents.end_epoch()
            _share_latent_slots(latents)
            ended = latents.stats()
        latents.begin_epoch(_chunk_order(cfg, loader, latents, batch.epoch), batch.skipped_rows)
    return batch, latents.read_rows(batch.rows), ended


def _agree_to_go_on(failed_here: bool, stop: lifecycle.StopSignals) -> tuple[int | None, bool]:
    """(the lowest process that failed this batch or None, whether any process got a stop
    signal): one tiny collective per batch, and none in a single process."""
    if distributed.world_size() == 1:
        return (0 if failed_here else None), stop.received is not None
    flags = torch.tensor([float(failed_here), float(stop.received is not None)])
    failed, stopping = distributed.max_over_ranks(flags).tolist()
    return (distributed.first_failed_rank(failed_here) if failed else None), bool(stopping)


def fit_batch(engine, latent_net, phi, images, cfg: RunConfig, clamp_mask, gen_dtype):
    """``train.inner_steps`` joint SGD updates of the batch's phi (in place: local to this
    process) and theta (``engine``: DeepSpeed averages its gradient over processes). Returns
    the last step's loss terms and output, and a device flag set if any loss was not finite
    (checked by the caller once per batch: no host sync here).

    The loss is scaled by this batch's share of a full batch (``data.batch_size``), so every
    image gets the same phi step and the same weight in theta's average whatever the size of
    the batch that holds it: a process dealt fewer images (uneven shards, the end of an
    epoch) runs smaller batches, not larger steps."""
    t = cfg.train
    scale = images.shape[0] / cfg.data.batch_size
    bad = torch.zeros((), dtype=torch.bool, device=images.device)
    for _ in range(t.inner_steps):
        z = latent_net(phi)
        output = engine(z.to(gen_dtype)).float()
        terms = lcm_loss(output, images, t.lap_levels, t.mse_weight)
        loss = terms["loss"]
        bad |= ~torch.isfinite(loss)
        engine.backward(loss * scale if scale != 1 else loss)
        engine.step()
        with torch.no_grad():
            phi -= t.lr_phi * phi.grad
            phi.grad = None
            clamp_phi_(phi, clamp_mask, cfg.model.clamp)
    return terms, output, bad


def train(cfg: RunConfig) -> TrainResult:
    """Run (or continue) the training described by ``cfg``. A SIGTERM or SIGUSR1 ends it
    early, after the current batch and a checkpoint."""
    stop = lifecycle.StopSignals()
    try:
        return _train(cfg, stop)
    finally:
        stop.close()


def _train(cfg: RunConfig, stop: lifecycle.StopSignals) -> TrainResult:
    distributed.init_distributed()  # picks DeepSpeed's accelerator before it is imported
    import deepspeed

    lifecycle.watch_launchers()
    _set_threads()
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.device()
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.train.deterministic:
        if device.type == "cuda":
            # cuBLAS is deterministic only with a fixed workspace; the generator's bilinear
            # upsampling has no deterministic CUDA backward, so on GPUs this is best effort.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")

    # Data, run lock, newest commit; then the latent table.
    # run_lock is held until this function returns.
    manifest, run_lock, commit = distributed.together("starting the run", lambda: _prepare(cfg))  # noqa: F841
    num_rows = manifest["num_samples"]
    if commit is not None and commit.state["step"] >= cfg.train.max_steps:
        if distributed.is_main():
            print(
                f"lcm-dist: the run in {cfg.run_dir} finished at step {commit.state['step']} "
                f"(train.max_steps is {cfg.train.max_steps}); raise train.max_steps to go on",
                flush=True,
            )
        return TrainResult(commit.state["step"], math.nan, math.nan, 0.0, [], [])
    latents = open_latents(cfg, manifest, commit)

    # Models. phi and the latent nets stay fp32 whatever precision DeepSpeed gives the
    # generator: the latent net's output is cast to the generator's dtype, and the gradient
    # flows back through that cast into fp32 phi.
    latent_net = BatchedLatentNet(cfg.model).to(device)
    clamp_mask = latent_net.mask
    generator = Generator(cfg.model)
    num_parameters = count_parameters(generator)  # before ZeRO-3 partitions them
    engine, _, _, _ = deepspeed.initialize(
        model=generator, model_parameters=generator.parameters(), config=deepspeed_config(cfg)
    )
    # Read checkpoints back without unpickling arbitrary objects.
    engine.checkpoint_engine = checkpoint.SafeCheckpointEngine(engine._config)
    start_step, start_epoch, start_batch, resumed_note = _start_position(cfg, engine, commit)
    gen_dtype = next(engine.module.parameters()).dtype
    # Under bf16 DeepSpeed casts the parameters but, with ZeRO, leaves the buffers fp32;
    # BatchNorm needs its running statistics in its weights' dtype.
    for buffer in engine.module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(gen_dtype)

    if distributed.is_main():
        write_resolved_config(cfg, cfg.run_dir)
        log = RunLogger(cfg.run_dir, cfg.train.max_steps, start_step - 1, cfg.log.progress)
        log.message(
            f"lcm-dist: {num_rows} images, {world} process(es) of {torch.get_num_threads()} "
            f"thread(s), phi {phi_layout(cfg.model).size} "
            f"floats/image, generator {num_parameters:,} parameters{resumed_note}"
        )
        if bottleneck_side(cfg.model) == 1:
            log.message(
                f"lcm-dist: warning: model.image_size {cfg.model.image_size} gives the generator "
                "1x1 inner layers, where BatchNorm cannot train phi (a batch of fresh latents has "
                "zero variance there); this run tests plumbing only, train models at 64 or more"
            )
    else:
        log = NullLogger()
    trace = RowTrace(cfg.run_dir, rank) if cfg.log.trace_rows else None

    # Held-back images for the restoration preview (rank 0 only; up to 8).
    held_back = None
    if cfg.log.restore_every_steps and distributed.is_main():
        from lcm_dist.evaluate import load_images

        held_back, _ = load_images([cfg.log.restore_images], cfg.model.image_size)
        held_back = held_back[:8]

    loader = ShardLoader(
        cfg.data.shards,
        batch_size=cfg.data.batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        image_size=cfg.model.image_size,
        start_epoch=start_epoch,
        start_batch=start_batch,
    )
    batches = iter(loader)
    epoch = None

    first_loss = last_loss = float("nan")
    window_start, window_images = time.perf_counter(), 0
    window_terms, window_steps = torch.zeros(3, device=device), 0
    run_start = time.perf_counter()
    images_per_second = 0.0
    t = cfg.train
    step_seconds: list[float] = []
    epoch_io: list[dict] = []
    position = (start_epoch, start_batch)
    committed = step = start_step - 1
    stopping = False
    for step in range(start_step, t.max_steps + 1):
        step_start = time.perf_counter()
        batch, phi_host, ended = distributed.together(
            f"reading batch {step}", lambda e=epoch: _next_batch(batches, latents, loader, cfg, e)
        )
        if ended is not None:
            epoch_io.append(ended)
        epoch, rows = batch.epoch, batch.rows
        images = _to_device(batch.images, device)
        phi = _to_device(phi_host, device).requires_grad_(True)

        terms, output, bad = fit_batch(engine, latent_net, phi, images, cfg, clamp_mask, gen_dtype)
        # Write the rows back and agree to go on: a non-finite loss or a failed write-back on
        # any process stops every process (each says why in one line); a stop signal on any
        # process ends the run after this batch's checkpoint.
        nonfinite, error = bool(bad), None  # the batch's one host sync
        if not nonfinite:
            try:
                latents.write_rows(rows, phi.detach().cpu())
            except Exception as err:
                error = err
        failed, stopping = _agree_to_go_on(nonfinite or error is not None, stop)
        if error is not None:
            raise error
        if nonfinite:
            raise NonFiniteLossError(
                f"the loss became {terms['loss'].item()} at step {step} on rank {rank} (rows "
                f"{rows[:4].tolist()}...); lower the learning rates in the config"
            )
        if failed is not None:
            raise distributed.PeerStopped(
                f"process {failed} of the run stopped at step {step} (its error is above)"
            )
        if trace is not None:
            trace.rows(step, batch.epoch, rows)
        position = (batch.epoch, batch.step_in_epoch + 1)
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or stopping:
            _checkpoint(cfg, engine, latents, step, position, num_rows)
            committed = step
        step_seconds.append(time.perf_counter() - step_start)

        # Reporting: loss terms of each batch's last inner step, averaged over the log window
        # (one batch's loss depends mostly on which images it holds; the window mean is the
        # trend).
        window_images += images.shape[0]
        window_terms += torch.stack([terms["loss"], terms["lap_l1"], terms["mse"]]).detach()
        window_steps += 1
        if step % cfg.log.every_steps == 0 or step == t.max_steps or stopping:
            values = distributed.mean_over_ranks(window_terms / window_steps).cpu()
            window_terms, window_steps = torch.zeros(3, device=device), 0
            elapsed = time.perf_counter() - window_start
            images_per_second = distributed.sum_over_ranks(window_images / max(elapsed, 1e-9))
            last_loss = float(values[0])
            if math.isnan(first_loss):
                first_loss = last_loss
            log.scalars(
                step,
                {
                    "loss/total": float(values[0]),
                    "loss/lap_l1": float(values[1]),
                    "loss/mse": float(values[2]),
                    "perf/images_per_second": images_per_second,
                    "lr/phi": t.lr_phi,
                    "lr/theta": float(engine.get_lr()[0]),
                    "data/epoch": float(batch.epoch),
                    **latents.stats(),
                },
            )
            log.progress(step, {"loss": last_loss, "img/s": images_per_second})
            window_start, window_images = time.perf_counter(), 0
        else:
            log.progress(step)
        if stopping:
            break
        if held_back is not None and step % cfg.log.restore_every_steps == 0:
            grid, hole_psnr = inpainting_preview(
                engine.module,
                latent_net,
                cfg.model,
                held_back,
                iterations=cfg.log.restore_iterations,
                loss={"levels": t.lap_levels, "mse_weight": t.mse_weight},
            )
            log.image(step, "restoration/inpainting", grid)
            log.scalars(step, {"restoration/inpainting_psnr_hole": hole_psnr})
        if cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0:
            n = min(8, images.shape[0])
            log.image(step, "reconstruction", image_grid([images[:n], output[:n].detach()]))

    # Write back what is still dirty and commit the end state, then report.
    if committed != step:
        _checkpoint(cfg, engine, latents, step, position, num_rows)
    if trace is not None:
        trace.generator(step, engine.module)
    epoch_io.append(latents.stats())
    log.scalars(step, latents.stats())
    latents.close()
    total = time.perf_counter() - run_start
    log.close()
    if step < t.max_steps:
        log.message(
            f"stopped on a stop signal: checkpoint {checkpoint.tag_for(step)} is committed; "
            "re-run the same command to continue"
        )
    log.message(
        f"done: step {step} ({len(step_seconds)} batches in {total:.1f}s), "
        f"loss {first_loss:.4f} -> {last_loss:.4f}"
    )
    return TrainResult(step, first_loss, last_loss, images_per_second, step_seconds, epoch_io)
