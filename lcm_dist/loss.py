"""The LCM reconstruction loss: Laplacian-pyramid L1 plus weighted MSE.

The pyramid is the Haar-style one: each level is downsampled by 2x2 averaging, and the band at
level j is G_j minus G_{j+1} upsampled back by pixel repetition; the last level is the low-pass
residual itself. The bands sum back to the image exactly, the pyramid costs a handful of pooling
ops, and a constant image has all its energy in the last level, which makes the loss easy to
check by hand. Level j is weighted 2^(-2j), each level's term is a mean L1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Bands of x (B, C, H, W): ``levels - 1`` band-pass images and the low-pass residual."""
    bands = []
    current = x
    for _ in range(levels - 1):
        if current.shape[-1] < 2 or current.shape[-2] < 2:
            raise ValueError(
                f"a {x.shape[-2]}x{x.shape[-1]} image is too small for a {levels}-level pyramid"
            )
        low = F.avg_pool2d(current, 2)
        bands.append(current - F.interpolate(low, scale_factor=2, mode="nearest"))
        current = low
    bands.append(current)
    return bands


def laplacian_l1(
    x: torch.Tensor, y: torch.Tensor, levels: int, reduction: str = "mean"
) -> torch.Tensor:
    """Lap-L1(x, y) = sum_j 2^(-2j) * mean |L_j(x) - L_j(y)|, per image or averaged."""
    total = x.new_zeros(x.shape[0])
    for j, (bx, by) in enumerate(
        zip(laplacian_pyramid(x, levels), laplacian_pyramid(y, levels), strict=True)
    ):
        total = total + 2.0 ** (-2 * j) * (bx - by).abs().flatten(1).mean(1)
    return total.mean() if reduction == "mean" else total


def lcm_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    levels: int = 4,
    mse_weight: float = 1.0,
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """The training loss and its terms: {'loss', 'lap_l1', 'mse'}.

    With ``reduction='none'`` every term is a (B,) vector, one value per image, which is what
    per-image fitting needs; with ``'mean'`` they are averaged over the batch.
    """
    lap = laplacian_l1(output, target, levels, reduction="none")
    mse = (output - target).pow(2).flatten(1).mean(1)
    terms = {"loss": lap + mse_weight * mse, "lap_l1": lap, "mse": mse}
    if reduction == "mean":
        return {k: v.mean() for k, v in terms.items()}
    if reduction != "none":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return terms
