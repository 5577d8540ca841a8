"""The training run's restoration preview: inpaint held-back images with the generator as it is."""

from __future__ import annotations

import numpy as np
import torch

from lcm_dist.config import ModelConfig
from lcm_dist.evaluate.metrics import psnr
from lcm_dist.images import image_grid
from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi
from lcm_dist.restore.degrade import Inpaint, box_mask
from lcm_dist.restore.fit import fit_phi
from lcm_dist.restore.model import RestorationModel


def inpainting_preview(
    generator: torch.nn.Module,
    net: BatchedLatentNet,
    model: ModelConfig,
    images: torch.Tensor,
    *,
    iterations: int,
    loss: dict,
) -> tuple[torch.Tensor, float]:
    """Inpaint a centred half-size hole in ``images`` with the generator as it is now (its
    parameters are left untouched: no gradient reaches them, and it runs in eval mode, on its
    BatchNorm running statistics, as restoration does; its train/eval mode is put back after);
    returns (grid of clean / masked / restored rows, mean PSNR over the holes)."""
    params = list(generator.parameters())
    flags = [p.requires_grad for p in params]
    was_training = generator.training
    for p in params:
        p.requires_grad_(False)
    generator.eval()
    try:
        device = params[0].device
        preview = RestorationModel(
            "(training)", {"loss": loss}, model, generator, net, initial_phi(model).to(device), None
        )
        op = Inpaint(box_mask(model.image_size, 0.5).to(device))
        images = images.to(device)
        restored, _ = fit_phi(preview, op(images), op, iterations=iterations)
    finally:
        generator.train(was_training)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    hole = op.hole(images.shape[0])[:, 0].cpu()
    score = float(
        np.mean([psnr(restored[i].cpu(), images[i].cpu(), hole[i]) for i in range(len(images))])
    )
    return image_grid([images, op.show(op(images)), restored]), score
