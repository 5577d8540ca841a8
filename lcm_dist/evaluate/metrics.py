"""Image quality metrics (scikit-image's), over a whole image or the pixels of a mask."""

from __future__ import annotations

import numpy as np
import torch

MAX_PSNR = 120.0
"""PSNR of identical images (a mean squared error of 1e-12), so that reports stay finite."""


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """PSNR in dB of (C, H, W) images in [0, 1], over the pixels where ``where`` (H, W) holds."""
    from skimage.metrics import peak_signal_noise_ratio

    x, y = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    if where is not None:
        keep = where.cpu().numpy().astype(bool)
        x, y = x[:, keep], y[:, keep]
    with np.errstate(divide="ignore"):
        value = peak_signal_noise_ratio(y, x, data_range=1.0)
    return float(min(value, MAX_PSNR))


def ssim(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """SSIM of (C, H, W) images in [0, 1] (7x7 windows), averaged over the pixels where
    ``where`` (H, W) holds."""
    from skimage.metrics import structural_similarity

    x = a.detach().cpu().permute(1, 2, 0).double().numpy()
    y = b.detach().cpu().permute(1, 2, 0).double().numpy()
    _, full = structural_similarity(x, y, channel_axis=2, data_range=1.0, full=True)
    full = full.mean(axis=2)
    return float(full.mean() if where is None else full[where.cpu().numpy().astype(bool)].mean())
