"""The training loop: per-image latent nets and the shared generator, trained jointly.

One batch of B images: read their phi rows from the latent table as a (B, P) tensor, then run
``train.inner_steps`` joint SGD updates. Each update evaluates all B latent nets at once, runs
the generator under DeepSpeed, computes Lap-L1 + MSE, and does one backward pass that gives
gradients for theta (averaged across ranks by DeepSpeed) and for phi (local: phi never enters
the engine). phi is then stepped by plain SGD and its conv weights clamped. The updated rows go
back to the write-back cache. Every ``checkpoint.every_steps`` batches and at the end, the run
commits a checkpoint (``lcm_dist.train.checkpoint``); re-running the same command continues from the
newest commit. ``Trainer`` builds the parts (``lcm_dist.train.setup``) and takes one step at a
time; ``train`` is the loop around it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from lcm_dist import distributed, lifecycle
from lcm_dist.config import RunConfig, bottleneck_side, write_resolved_config
from lcm_dist.data.loader import Batch, ShardLoader
from lcm_dist.model.generator import Generator, count_parameters
from lcm_dist.model.latent_net import BatchedLatentNet, clamp_phi_, phi_layout
from lcm_dist.model.loss import lcm_loss
from lcm_dist.restore.fit import inpainting_preview
from lcm_dist.train import checkpoint
from lcm_dist.train import setup as run_setup
from lcm_dist.train.monitor import NullLogger, PhaseClock, RowTrace, RunLogger, image_grid


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


@dataclass
class Stepped:
    """What one batch gave: its last inner step's loss terms and output, and its images."""

    batch: Batch
    images: torch.Tensor
    output: torch.Tensor
    terms: dict[str, torch.Tensor]
    stopping: bool  # a stop signal came: this batch was the last


def fit_batch(engine, latent_net, phi, images, cfg: RunConfig, clamp_mask, gen_dtype, clock=None):
    """``train.inner_steps`` joint SGD updates of the batch's phi (in place: local to this
    process) and theta (``engine``: DeepSpeed averages its gradient over processes). Returns
    the last step's loss terms and output, and a device flag set if any loss was not finite
    (checked by the caller once per batch: no host sync here).

    The loss is scaled by this batch's share of a full batch (``data.batch_size``), so every
    image gets the same phi step and the same weight in theta's average whatever the size of
    the batch that holds it: a process dealt fewer images (uneven shards, the end of an
    epoch) runs smaller batches, not larger steps. ``clock`` (a PhaseClock) times the
    forward+backward and optimizer phases."""
    t = cfg.train
    scale = images.shape[0] / cfg.data.batch_size
    bad = torch.zeros((), dtype=torch.bool, device=images.device)
    for _ in range(t.inner_steps):
        start = clock.mark() if clock else None
        z = latent_net(phi)
        output = engine(z.to(gen_dtype)).float()
        terms = lcm_loss(output, images, t.lap_levels, t.mse_weight)
        loss = terms["loss"]
        bad |= ~torch.isfinite(loss)
        engine.backward(loss * scale if scale != 1 else loss)
        middle = clock.mark() if clock else None
        engine.step()
        with torch.no_grad():
            phi -= t.lr_phi * phi.grad
            phi.grad = None
            clamp_phi_(phi, clamp_mask, cfg.model.clamp)
        if clock:
            clock.add("forward_backward", start, middle)
            clock.add("optimizer", middle, clock.mark())
    return terms, output, bad


def _agree_to_go_on(failed_here: bool, stop: lifecycle.StopSignals) -> tuple[int | None, bool]:
    """(the lowest process that failed this batch or None, whether any process got a stop
    signal): one tiny collective per batch, and none in a single process."""
    if distributed.world_size() == 1:
        return (0 if failed_here else None), stop.received is not None
    flags = torch.tensor([float(failed_here), float(stop.received is not None)])
    failed, stopping = distributed.max_over_ranks(flags).tolist()
    return (distributed.first_failed_rank(failed_here) if failed else None), bool(stopping)


class Trainer:
    """A run's parts, built once and in order from the config (process group, data and
    checkpoint, latents, models and engine, position, logger, loader), and its step."""

    def __init__(self, cfg: RunConfig, stop: lifecycle.StopSignals | None = None):
        self.cfg, self.stop = cfg, stop or lifecycle.StopSignals()
        distributed.init_distributed()  # picks DeepSpeed's accelerator before it is imported
        import deepspeed

        lifecycle.watch_launchers()
        run_setup.set_threads()
        self.rank, world = distributed.rank(), distributed.world_size()
        self.device = device = distributed.device()
        torch.manual_seed(cfg.train.seed + self.rank)
        if cfg.train.deterministic:
            if device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace; the generator's bilinear
                # upsampling has no deterministic CUDA backward, so on GPUs this is best effort.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")

        # Data, run lock (held while this object lives), newest commit.
        manifest, self._lock, commit = distributed.together(
            "starting the run", lambda: run_setup.prepare(cfg)
        )
        self.num_rows = manifest["num_samples"]
        self.finished_at = None
        if commit is not None and commit.state["step"] >= cfg.train.max_steps:
            self.finished_at = commit.state["step"]
            return
        self.latents = run_setup.open_latents(cfg, manifest, commit)

        # Models. phi and the latent nets stay fp32 whatever precision DeepSpeed gives the
        # generator: the latent net's output is cast to the generator's dtype, and the gradient
        # flows back through that cast into fp32 phi.
        self.latent_net = BatchedLatentNet(cfg.model).to(device)
        generator = Generator(cfg.model)
        num_parameters = count_parameters(generator)  # before ZeRO-3 partitions them
        self.engine, _, _, _ = deepspeed.initialize(
            model=generator,
            model_parameters=generator.parameters(),
            config=run_setup.deepspeed_config(cfg),
        )
        # Read checkpoints back without unpickling arbitrary objects.
        self.engine.checkpoint_engine = checkpoint.SafeCheckpointEngine(self.engine._config)
        self.start_step, epoch, batch, resumed = run_setup.start_position(cfg, self.engine, commit)
        self.gen_dtype = next(self.engine.module.parameters()).dtype
        # Under bf16 DeepSpeed casts the parameters but, with ZeRO, leaves the buffers fp32;
        # BatchNorm needs its running statistics in its weights' dtype.
        for buffer in self.engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(self.gen_dtype)

        # Reporting.
        if distributed.is_main():
            write_resolved_config(cfg, cfg.run_dir)
            self.log = RunLogger(
                cfg.run_dir, cfg.train.max_steps, self.start_step - 1, cfg.log.progress
            )
            self.log.message(
                f"lcm-dist: {self.num_rows} images, {world} process(es) of "
                f"{torch.get_num_threads()} thread(s), phi {phi_layout(cfg.model).size} "
                f"floats/image, generator {num_parameters:,} parameters{resumed}"
            )
            if bottleneck_side(cfg.model) == 1:
                self.log.message(
                    f"lcm-dist: warning: model.image_size {cfg.model.image_size} gives the "
                    "generator 1x1 inner layers, where BatchNorm cannot train phi (a batch of "
                    "fresh latents has zero variance there); this run tests plumbing only, "
                    "train models at 64 or more"
                )
        else:
            self.log = NullLogger()
        self.trace = RowTrace(cfg.run_dir, self.rank) if cfg.log.trace_rows else None
        self.clock = PhaseClock(device)
        # FLOPs per image (forward and backward of the latent net and the generator), counted
        # once with torch's FLOP counter, for the FLOP/s and utilisation scalars.
        from lcm_dist.planning.cost import model_cost

        cost = model_cost(cfg)
        self.flops_per_image = cost.forward_flops + cost.backward_flops

        # Data, from the committed position on.
        self.loader = ShardLoader(
            cfg.data.shards,
            batch_size=cfg.data.batch_size,
            rank=self.rank,
            world_size=world,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            image_size=cfg.model.image_size,
            start_epoch=epoch,
            start_batch=batch,
        )
        self._batches = iter(self.loader)
        self.epoch: int | None = None
        self.position = (epoch, batch)
        self.epoch_io: list[dict] = []

    def step(self, step: int) -> Stepped:
        """Train batch number ``step`` and take its rows back into the latent table."""
        cfg = self.cfg
        start = time.perf_counter()
        batch, phi_host, ended, loader_wait = distributed.together(
            f"reading batch {step}",
            lambda: run_setup.next_batch(self._batches, self.latents, self.loader, cfg, self.epoch),
        )
        self.clock.add_host("data_wait", loader_wait)
        self.clock.add_host("store_wait", time.perf_counter() - start - loader_wait)
        if ended is not None:
            self.epoch_io.append(ended)
        self.epoch, rows = batch.epoch, batch.rows
        images = run_setup.to_device(batch.images, self.device)
        phi = run_setup.to_device(phi_host, self.device).requires_grad_(True)
        terms, output, bad = fit_batch(
            self.engine,
            self.latent_net,
            phi,
            images,
            cfg,
            self.latent_net.mask,
            self.gen_dtype,
            self.clock,
        )
        start = time.perf_counter()
        # Write the rows back and agree to go on: a non-finite loss or a failed write-back on
        # any process stops every process (each says why in one line); a stop signal on any
        # process ends the run after this batch's checkpoint.
        nonfinite, error = bool(bad), None  # the batch's one host sync
        if not nonfinite:
            try:
                self.latents.write_rows(rows, phi.detach().cpu())
            except Exception as err:
                error = err
        failed, stopping = _agree_to_go_on(nonfinite or error is not None, self.stop)
        if error is not None:
            raise error
        if nonfinite:
            raise NonFiniteLossError(
                f"the loss became {terms['loss'].item()} at step {step} on rank {self.rank} "
                f"(rows {rows[:4].tolist()}...); lower the learning rates in the config"
            )
        if failed is not None:
            raise distributed.PeerStopped(
                f"process {failed} of the run stopped at step {step} (its error is above)"
            )
        self.clock.add_host("write_back", time.perf_counter() - start)
        if self.trace is not None:
            self.trace.rows(step, batch.epoch, rows)
        self.position = (batch.epoch, batch.step_in_epoch + 1)
        return Stepped(batch, images, output, terms, stopping)

    def checkpoint(self, step: int) -> None:
        start = time.perf_counter()
        run_setup.commit_checkpoint(
            self.cfg, self.engine, self.latents, step, self.position, self.num_rows
        )
        self.clock.add_host("checkpoint", time.perf_counter() - start)

    def performance(self, images: int, seconds: float) -> dict[str, float]:
        """The window's scalars of where the time went and what the hardware achieved:
        seconds per phase (this process), FLOP/s (from the model's FLOPs per image, counted
        once), and on a GPU its peak memory and, with log.accelerator_tflops, the model FLOP
        utilisation."""
        out = {f"time/{phase}_s": value for phase, value in self.clock.seconds().items()}
        tflops = self.flops_per_image * images * self.cfg.train.inner_steps / seconds / 1e12
        out["perf/tflops_per_process"] = tflops
        if self.device.type == "cuda":
            out["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            if self.cfg.log.accelerator_tflops:
                out["perf/mfu"] = tflops / self.cfg.log.accelerator_tflops
        return out

    def close(self, step: int) -> None:
        if self.trace is not None:
            self.trace.generator(step, self.engine.module)
        self.epoch_io.append(self.latents.stats())
        self.log.scalars(step, self.latents.stats())
        self.latents.close()
        self.log.close()


class _Window:
    """Loss terms and images of the batches since the last log line (kept on the device: the
    loop reads them back once per window)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.terms, self.steps, self.images = torch.zeros(3, device=self.device), 0, 0
        self.start = time.perf_counter()

    def add(self, stepped: Stepped) -> None:
        t = stepped.terms
        self.terms += torch.stack([t["loss"], t["lap_l1"], t["mse"]]).detach()
        self.steps += 1
        self.images += stepped.images.shape[0]

    def close(self) -> tuple[list[float], dict[str, float], int, float]:
        """(mean loss terms over the processes, images/s scalars, this process's images and
        seconds in the window); then empty."""
        values = distributed.mean_over_ranks(self.terms / self.steps).cpu().tolist()
        images, elapsed = self.images, max(time.perf_counter() - self.start, 1e-9)
        own = images / elapsed
        slowest = -float(distributed.max_over_ranks(torch.tensor([-own], dtype=torch.float64)))
        speed = {
            "perf/images_per_second": distributed.sum_over_ranks(own),
            "perf/images_per_second_per_process": own,
            "perf/images_per_second_slowest_process": slowest,
        }
        self.reset()
        return values, speed, images, elapsed


def train(cfg: RunConfig) -> TrainResult:
    """Run (or continue) the training described by ``cfg``. A SIGTERM or SIGUSR1 ends it
    early, after the current batch and a checkpoint."""
    stop = lifecycle.StopSignals()
    try:
        return _train(cfg, stop)
    finally:
        stop.close()


def _train(cfg: RunConfig, stop: lifecycle.StopSignals) -> TrainResult:
    trainer = Trainer(cfg, stop)
    if trainer.finished_at is not None:
        if distributed.is_main():
            print(
                f"lcm-dist: the run in {cfg.run_dir} finished at step {trainer.finished_at} "
                f"(train.max_steps is {cfg.train.max_steps}); raise train.max_steps to go on",
                flush=True,
            )
        return TrainResult(trainer.finished_at, math.nan, math.nan, 0.0, [], [])
    log, t = trainer.log, cfg.train

    # Held-back images for the restoration preview (rank 0 only; up to 8).
    held_back = None
    if cfg.log.restore_every_steps and distributed.is_main():
        from lcm_dist.evaluate.report import load_images

        held_back = load_images([cfg.log.restore_images], cfg.model.image_size)[0][:8]

    first_loss = last_loss = float("nan")
    images_per_second = 0.0
    window = _Window(trainer.device)
    run_start = time.perf_counter()
    step_seconds: list[float] = []
    committed = step = trainer.start_step - 1
    for step in range(trainer.start_step, t.max_steps + 1):
        step_start = time.perf_counter()
        out = trainer.step(step)
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or out.stopping:
            trainer.checkpoint(step)
            committed = step
        step_seconds.append(time.perf_counter() - step_start)

        # Reporting: loss terms of each batch's last inner step, averaged over the log window
        # (one batch's loss depends mostly on which images it holds; the window mean is the
        # trend).
        window.add(out)
        if step % cfg.log.every_steps == 0 or step == t.max_steps or out.stopping:
            values, speed, images, seconds = window.close()
            images_per_second = speed["perf/images_per_second"]
            last_loss = values[0]
            first_loss = last_loss if math.isnan(first_loss) else first_loss
            log.scalars(
                step,
                {
                    "loss/total": values[0],
                    "loss/lap_l1": values[1],
                    "loss/mse": values[2],
                    **speed,
                    **trainer.performance(images, seconds),
                    "lr/phi": t.lr_phi,
                    "lr/theta": float(trainer.engine.get_lr()[0]),
                    "data/epoch": float(out.batch.epoch),
                    **trainer.latents.stats(),
                },
            )
            log.progress(step, {"loss": last_loss, "img/s": images_per_second})
        else:
            log.progress(step)
        if out.stopping:
            break
        if held_back is not None and step % cfg.log.restore_every_steps == 0:
            grid, hole_psnr = inpainting_preview(
                trainer.engine.module,
                trainer.latent_net,
                cfg.model,
                held_back,
                iterations=cfg.log.restore_iterations,
                loss={"levels": t.lap_levels, "mse_weight": t.mse_weight},
            )
            log.image(step, "restoration/inpainting", grid)
            log.scalars(step, {"restoration/inpainting_psnr_hole": hole_psnr})
        if cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0:
            n = min(8, out.images.shape[0])
            log.image(step, "reconstruction", image_grid([out.images[:n], out.output[:n].detach()]))

    # Write back what is still dirty and commit the end state, then report.
    if committed != step:
        trainer.checkpoint(step)
    trainer.close(step)
    total = time.perf_counter() - run_start
    if step < t.max_steps:
        log.message(
            f"stopped on a stop signal: checkpoint {checkpoint.tag_for(step)} is committed; "
            "re-run the same command to continue"
        )
    log.message(
        f"done: step {step} ({len(step_seconds)} batches in {total:.1f}s), "
        f"loss {first_loss:.4f} -> {last_loss:.4f}"
    )
    return TrainResult(
        step, first_loss, last_loss, images_per_second, step_seconds, trainer.epoch_io
    )
