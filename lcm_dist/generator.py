"""The shared generator g_theta: an hourglass with skip connections from z to the image.

z (C_z x S x S) goes through an encoder that halves the resolution once per entry of
``gen_widths``, back up through a decoder that concatenates a 1x1-conv skip from each encoder
level, then through ``gen_head_widths`` upsampling stages (x2 each) to the image resolution, and
a final 3x3 conv with a sigmoid. Convolutions carry no bias because each is followed by a
normalization with a learned per-channel scale and shift.

The normalization is per image (GroupNorm, up to 16 groups), not BatchNorm: an image's output
depends on its own z only, never on the rest of its batch, and the generator computes the same
function in training and when restoring (fitting a fresh phi with the generator frozen), with
no running statistics to drift. It has the same parameters as BatchNorm (a scale and a shift
per channel), so the parameter counts are unchanged. The ``paper`` preset (widths 192-384-512-512-1024, skips of 144 channels, heads 32-32)
has 38,696,224 parameters at 128x128, the size of the reference generator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lcm_dist.config import ModelConfig


def _norm(channels: int) -> nn.Module:
    """Per-image normalization over groups of channels (up to 16 groups)."""
    return nn.GroupNorm(math.gcd(channels, 16), channels)


def _conv_norm_act(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        _norm(c_out),
        nn.LeakyReLU(0.2, inplace=True),
    ]


class Generator(nn.Module):
    """Maps latent tensors z (B, C_z, S, S) to images (B, C, H, W) in [0, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c_z = cfg.latent_widths[-1]
        widths = list(cfg.gen_widths)
        skip = cfg.gen_skip
        self.down = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.up = nn.ModuleList()
        c_in = c_z
        for w in widths:
            # The skip taps the input of each encoder level, at that level's resolution.
            self.skips.append(nn.Sequential(*_conv_norm_act(c_in, skip, 1)) if skip else None)
            self.down.append(
                nn.Sequential(*_conv_norm_act(c_in, w, 3, 2), *_conv_norm_act(w, w, 3))
            )
            c_in = w
        for level in reversed(range(len(widths))):
            c_out = widths[level - 1] if level > 0 else widths[0]
            c_cat = c_in + skip
            self.up.append(
                nn.Sequential(
                    _norm(c_cat),
                    *_conv_norm_act(c_cat, c_out, 3),
                    *_conv_norm_act(c_out, c_out, 1),
                )
            )
            c_in = c_out
        heads: list[nn.Module] = []
        for h in cfg.gen_head_widths:
            heads += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv_norm_act(c_in, h, 3)]
            heads += _conv_norm_act(h, h, 3)
            c_in = h
        self.head = nn.Sequential(*heads)
        self.out = nn.Conv2d(c_in, cfg.image_channels, 3, padding=1, bias=False)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        taps = []
        x = z
        for down, skip in zip(self.down, self.skips, strict=True):
            taps.append(skip(x) if skip is not None else None)
            x = down(x)
        for up, tap in zip(self.up, reversed(taps), strict=True):
            x = self.upsample(x)
            if tap is not None:
                x = torch.cat([x, tap], dim=1)
            x = up(x)
        return torch.sigmoid(self.out(self.head(x)))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
