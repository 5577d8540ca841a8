"""The training loop: per-image latent nets and the shared generator, trained jointly.

One batch of B images: read their phi rows from the latent table as a (B, P) tensor, then run
``train.inner_steps`` joint SGD updates. Each update evaluates all B latent nets at once, runs
the generator under DeepSpeed, computes Lap-L1 + MSE, and does one backward pass that gives
gradients for theta (averaged across ranks by DeepSpeed) and for phi (local: phi never enters
the engine). phi is then stepped by plain SGD and its conv weights clamped. The updated rows go
back to the write-back cache. Every ``checkpoint.every_steps`` batches and at the end, the run
commits a checkpoint (``lcm_dist.train.checkpoint``); re-running the same command continues from the
newest commit. ``Trainer`` (``lcm_dist.train.trainer``) builds the parts and takes one step at a time
(``lcm_dist.train.step``); ``train`` here is the loop around it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from lcm_dist import distributed, lifecycle
from lcm_dist.config import RunConfig
from lcm_dist.images import image_grid
from lcm_dist.train import checkpoint
from lcm_dist.train.preview import inpainting_preview
from lcm_dist.train.step import NonFiniteLossError, Stepped
from lcm_dist.train.trainer import Trainer

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]


@dataclass
class TrainResult:
    """What a finished run reports back (used by the demo, tests and benchmarks)."""

    steps: int
    first_loss: float
    last_loss: float
    images_per_second: float
    step_seconds: list[float]  # wall time of every step, data loading included
    epoch_io: list[dict]  # latent store counters at each epoch's end and at the run's end


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
    try:
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
            from lcm_dist.images import load_images

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
            if (
                cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            ) or out.stopping:
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
                log.image(
                    step, "reconstruction", image_grid([out.images[:n], out.output[:n].detach()])
                )

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
    finally:
        # Stop the loader's worker processes now, also on an error: they ignore SIGTERM
        # and the interpreter would wait for them at exit.
        trainer.close_loader()
