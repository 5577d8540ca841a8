"""One batch's work: ``train.inner_steps`` joint updates of its phi and of theta, and the one
per-batch agreement between processes on whether to go on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcm_dist import distributed, lifecycle
from lcm_dist.config import RunConfig
from lcm_dist.data.loader import Batch
from lcm_dist.model.latent_net import clamp_phi_
from lcm_dist.model.loss import lcm_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


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
            # DeepSpeed skips theta's step on a non-finite gradient where it checks for one
            # (its bf16 optimizer under ZeRO stage 0, every step; deepspeed_config turns the
            # check off under ZeRO 1-2): phi then skips its step too, so the two always step
            # together. The flag is a host bool DeepSpeed already read.
            if getattr(getattr(engine, "optimizer", None), "overflow", False) is not True:
                phi -= t.lr_phi * phi.grad
                clamp_phi_(phi, clamp_mask, cfg.model.clamp)
            phi.grad = None
        if clock:
            clock.add("forward_backward", start, middle)
            clock.add("optimizer", middle, clock.mark())
    return terms, output, bad


def agree_to_go_on(failed_here: bool, stop: lifecycle.StopSignals) -> tuple[int | None, bool]:
    """(the lowest process that failed this batch or None, whether any process got a stop
    signal): one tiny collective per batch, and none in a single process."""
    if distributed.world_size() == 1:
        return (0 if failed_here else None), stop.received is not None
    flags = torch.tensor([float(failed_here), float(stop.received is not None)])
    failed, stopping = distributed.max_over_ranks(flags).tolist()
    return (distributed.first_failed_rank(failed_here) if failed else None), bool(stopping)
