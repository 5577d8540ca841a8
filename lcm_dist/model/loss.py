"""The LCM reconstruction loss: Laplacian-pyramid L1 plus weighted MSE, as the authors define it.

Each pyramid level blurs its input with a fixed 5x5 kernel (per channel, zero padding); the band
is the input minus its blur, and the next level is the blur averaged over 2x2 blocks. The kernel
is proportional to g(i) + g(j) with g(t) = exp(-(t - 2)^2 / 4), normalised to sum 1: a sum of
the two 1-D profiles, not their product, so it is not a separable Gaussian (centre 0.061,
corners 0.022). With ``levels`` terms there are ``levels - 1`` bands and the low-pass residual;
term j is weighted 2^(-2j) and is a mean L1. ``levels=4`` is the authors' ``max_levels=3``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BLUR_SIZE = 5


@functools.cache
def blur_kernel() -> torch.Tensor:
    """The (5, 5) float64 blur kernel: k[i, j] proportional to g(i) + g(j), summing to 1."""
    centre = BLUR_SIZE // 2
    g = torch.tensor(
        [math.exp(-((t - centre) ** 2) / 4.0) for t in range(BLUR_SIZE)], dtype=torch.float64
    )
    kernel = g[:, None] + g[None, :]
    return kernel / kernel.sum()


@functools.cache
def blur_kernel_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``blur_kernel`` as a (1, 1, 5, 5) tensor on ``device`` in ``dtype``, copied there once:
    a copy in every blur would make each inner step wait for the GPU (a host-to-device copy
    from pageable memory synchronises)."""
    return blur_kernel().to(device, dtype)[None, None]


def blur(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) blurred per channel with ``blur_kernel``, zero padding, same size."""
    c = x.shape[1]
    weight = blur_kernel_on(x.device, x.dtype).expand(c, 1, BLUR_SIZE, BLUR_SIZE)
    return F.conv2d(x, weight, padding=BLUR_SIZE // 2, groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Terms of x (B, C, H, W): ``levels - 1`` band-pass images and the low-pass residual."""
    terms = []
    current = x
    for _ in range(levels - 1):
        if current.shape[-1] < 2 or current.shape[-2] < 2:
            raise ValueError(
                f"a {x.shape[-2]}x{x.shape[-1]} image is too small for a {levels}-level pyramid"
            )
        low = blur(current)
        terms.append(current - low)
        current = F.avg_pool2d(low, 2)
    terms.append(current)
    return terms


def laplacian_l1(
    x: torch.Tensor, y: torch.Tensor, levels: int, reduction: str = "mean"
) -> torch.Tensor:
    """Lap-L1(x, y) = sum_j 2^(-2j) * mean |L_j(x) - L_j(y)|, per image or averaged."""
    total = x.new_zeros(x.shape[0])
    # The pyramid is linear, so the pyramid of the difference is the difference of pyramids.
    for j, band in enumerate(laplacian_pyramid(x - y, levels)):
        total = total + 2.0 ** (-2 * j) * band.abs().flatten(1).mean(1)
    return total.mean() if reduction == "mean" else total


def lcm_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    levels: int = 4,
    mse_weight: float = 1.0,
    reduction: str = "mean",
    pixel_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The training loss and its terms: {'loss', 'lap_l1', 'mse'}.

    ``pixel_weight`` (broadcastable to the images) multiplies the difference inside the MSE term
    only, as the authors' inpainting does (a weight w counts w^2 in squared error). With
    ``reduction='none'`` every term is a (B,) vector, one value per image, which is what
    per-image fitting needs; with ``'mean'`` they are averaged over the batch.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    lap = laplacian_l1(output, target, levels, reduction="none")
    diff = output - target
    if pixel_weight is not None:
        diff = diff * pixel_weight
    mse = diff.pow(2).flatten(1).mean(1)
    terms = {"loss": lap + mse_weight * mse, "lap_l1": lap, "mse": mse}
    if reduction == "mean":
        return {k: v.mean() for k, v in terms.items()}
    return terms
