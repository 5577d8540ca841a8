"""Deep Image Prior (Ulyanov, Vedaldi, Lempitsky, CVPR 2018): the learned-nothing baseline.

Each degraded image gets its own randomly initialised hourglass network with a fixed noise
input z (``input_channels`` channels, uniform x 0.1) that is fitted with Adam so that
A(net(z)) matches the observation; the network's structure is the only prior. As in the DIP
paper's "skip" architecture: an encoder-decoder with strided 3x3 convs down, bilinear
upsampling up, a few-channel skip connection per level, BatchNorm and LeakyReLU(0.2), a
sigmoid output, MSE data term, and the input perturbed by Gaussian noise (``reg_noise_std``)
at every iteration. Defaults follow the paper's super-resolution and inpainting settings
scaled to small images (up to 5 levels of 128 channels, the coarsest at least 4x4; skips of 4
channels; lr 0.01; reg_noise_std 1/30).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lcm_dist.restore.degrade import Degradation


def _block(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, padding_mode="reflect"),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    ]


class SkipNet(nn.Module):
    """DIP's hourglass with skip connections."""

    def __init__(
        self,
        c_in: int = 32,
        c_out: int = 3,
        channels: tuple[int, ...] = (128, 128, 128, 128, 128),
        skip: int = 4,
    ):
        super().__init__()
        self.down = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.up = nn.ModuleList()
        c = c_in
        for width in channels:
            self.skips.append(nn.Sequential(*_block(c, skip, 1)))
            self.down.append(nn.Sequential(*_block(c, width, 3, 2), *_block(width, width, 3)))
            c = width
        for level in reversed(range(len(channels))):
            width = channels[level]
            self.up.append(
                nn.Sequential(
                    nn.BatchNorm2d(c + skip), *_block(c + skip, width, 3), *_block(width, width, 1)
                )
            )
            c = width
        self.out = nn.Conv2d(c, c_out, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        taps = []
        x = z
        for skip, down in zip(self.skips, self.down, strict=True):
            taps.append(skip(x))
            x = down(x)
        for up, tap in zip(self.up, reversed(taps), strict=True):
            x = F.interpolate(x, size=tap.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, tap], 1))
        return torch.sigmoid(self.out(x))


def dip_restore(
    observed: torch.Tensor,
    operator: Degradation,
    size: int,
    *,
    iterations: int = 500,
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """Restore each observation (B, C, h, w) with its own DIP network, one after the other,
    on ``device``; returns (images (B, 3, size, size) on the CPU, seconds). Keyword arguments
    as ``dip_restore_at``."""
    return dip_restore_at(observed, operator, size, [iterations], **kwargs)[iterations]


def dip_restore_at(
    observed: torch.Tensor,
    operator: Degradation,
    size: int,
    counts: list[int],
    *,
    lr: float = 0.01,
    reg_noise_std: float = 1.0 / 30,
    input_channels: int = 32,
    channels: tuple[int, ...] = (128, 128, 128, 128, 128),
    seed: int = 0,
    progress=None,
    device: torch.device | str = "cpu",
) -> dict[int, tuple[torch.Tensor, float]]:
    """DIP fitted once for the largest of ``counts`` iterations and read out after each count:
    {count: (images (B, 3, size, size) on the CPU, seconds)}. An image's output after n
    iterations is the one a fit of n iterations gives (same seed, same random draws); the
    seconds of a count are the fitting time of its iterations, summed over the images (the
    read-outs are not counted)."""
    counts = sorted(set(counts))
    if not counts or counts[0] < 1:
        raise ValueError(f"DIP iteration counts must be at least 1, got {counts}")
    # Small images get fewer levels: the coarsest stays at least 4x4 (BatchNorm of one image
    # needs more than one value per channel).
    channels = tuple(channels[: max(1, int(math.log2(size)) - 2)])
    outputs: dict[int, list[torch.Tensor]] = {n: [] for n in counts}
    seconds = dict.fromkeys(counts, 0.0)
    for i in range(observed.shape[0]):
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed + i)
        z = (torch.rand(1, input_channels, size, size, generator=gen) * 0.1).to(device)
        torch.manual_seed(seed + i)
        net = SkipNet(input_channels, 3, channels).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        y = observed[i : i + 1].to(device)
        op = operator.subset(slice(i, i + 1)).to(device)
        fitting = 0.0
        for it in range(1, counts[-1] + 1):
            opt.zero_grad(set_to_none=True)
            z_in = z + reg_noise_std * torch.randn_like(z) if reg_noise_std else z
            loss = F.mse_loss(op(net(z_in)), y)
            loss.backward()
            opt.step()
            if progress is not None:
                progress.update(1)
            if it in outputs:
                fitting += time.perf_counter() - start
                # BatchNorm of a batch of one, as fitted (DIP never uses eval)
                with torch.no_grad():
                    outputs[it].append(net(z).clamp(0, 1).cpu())
                seconds[it] += fitting
                start = time.perf_counter()
    return {n: (torch.cat(outputs[n]), seconds[n]) for n in counts}
