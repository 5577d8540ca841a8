"""The shared generator g_theta: the authors' encoder-decoder (EncDecCelebA), at any width.

z (C_z x S x S) goes down through three 4x4 stride-2 convs to S/8, through three dilated 3x3
grouped convs (two channels per group) at S/8, then up: the dilated output is concatenated with
the third encoder level and goes through a 4x4 stride-2 transposed conv, whose output is
concatenated with the second encoder level for the next one; two more transposed convs reach
2S, a bilinear x2 upsampling (align_corners=True) reaches 4S, and three 3x3 convs give the
image through a sigmoid. No layer has a bias; every layer but the last is followed by
BatchNorm and LeakyReLU(0.2).

BatchNorm is used as the authors use it: batch statistics while training (``train()``), running
statistics while restoring (``eval()``), so a restored image does not depend on the other
images of its batch. The running statistics are buffers of the module and travel with its
``state_dict``; they stay float32 when the module is cast to bf16 (``FP32StatsBatchNorm2d``).
The ``paper`` preset (widths 256-512-1024, 512-512-256-128, 64-32) has
38,696,224 parameters at 128x128, and the CPU presets keep the same layers with fewer channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lcm_dist.config import ModelConfig

SLOPE = 0.2
"""Negative slope of every LeakyReLU of the generator."""


class FP32StatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics stay float32 whatever the module is cast to.

    Under bf16 (DeepSpeed casts the generator's parameters, and ``module.to(torch.bfloat16)``
    its buffers too) a bf16 running variance near 1 moves in steps of 2^-7: an update of
    momentum x (batch variance - running variance) smaller than half that step rounds away,
    so the statistics stall (at a true variance of 1.035 they stayed at 1.000). Here a cast
    to a 16-bit type moves the statistics to the new device but keeps them float32 (a cast to
    float64 takes them along), and a low-precision input is normalised with float32
    statistics and weights (the output keeps the input's dtype); the gradient of the bf16
    weights flows back through that upcast."""

    _STATS = ("running_mean", "running_var")

    def _apply(self, fn, recurse=True):
        stats = {name: self._buffers[name] for name in self._STATS}
        for name in self._STATS:
            self._buffers[name] = None  # skipped by the cast, and the buffers keep their order
        try:
            super()._apply(fn, recurse)
        finally:
            for name, stat in stats.items():
                if stat is not None:
                    # fn on an empty probe tells where fn sends tensors, without rounding ours:
                    # to 16-bit types the statistics only move; to 32 or 64 bits they follow.
                    probe = fn(torch.empty(0, dtype=stat.dtype, device=stat.device))
                    wide = probe.is_floating_point() and probe.element_size() >= 4
                    stat = stat.to(probe.device, probe.dtype if wide else stat.dtype)
                self._buffers[name] = stat
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != self.running_mean.dtype:
            weight, bias = weight.to(self.running_mean.dtype), bias.to(self.running_mean.dtype)
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            self.training,
            self.momentum,
            self.eps,
        )


class Generator(nn.Module):
    """Maps latent tensors z (B, C_z, S, S) to images (B, C, 4S, 4S) in [0, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c_z = cfg.latent_widths[-1]
        e1, e2, e3 = cfg.gen_encoder_widths
        d1, d2, d3, d4 = cfg.gen_decoder_widths
        h1, h2 = cfg.gen_head_widths

        def conv(c_in, c_out, kernel, stride=1, padding=1, dilation=1, groups=1):
            return nn.Conv2d(
                c_in, c_out, kernel, stride, padding, dilation, groups=groups, bias=False
            )

        def up(c_in, c_out):
            return nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)

        # Encoder: S -> S/2 -> S/4 -> S/8.
        self.enc1, self.enc1_bn = conv(c_z, e1, 4, 2), FP32StatsBatchNorm2d(e1)
        self.enc2, self.enc2_bn = conv(e1, e2, 4, 2), FP32StatsBatchNorm2d(e2)
        self.enc3, self.enc3_bn = conv(e2, e3, 4, 2), FP32StatsBatchNorm2d(e3)
        # Three dilated grouped convs at S/8 (two input channels per group).
        self.mid = nn.ModuleList(
            conv(e3, e3, 3, padding=2, dilation=2, groups=e3 // 2) for _ in range(3)
        )
        self.mid_bn = nn.ModuleList(FP32StatsBatchNorm2d(e3) for _ in range(3))
        # Decoder: S/8 -> S/4 (with the enc3 skip) -> S/2 (with the enc2 skip) -> S -> 2S.
        self.dec1, self.dec1_bn = up(e3 + e3, d1), FP32StatsBatchNorm2d(d1)
        self.dec2, self.dec2_bn = up(d1 + e2, d2), FP32StatsBatchNorm2d(d2)
        self.dec3, self.dec3_bn = up(d2, d3), FP32StatsBatchNorm2d(d3)
        self.dec4, self.dec4_bn = up(d3, d4), FP32StatsBatchNorm2d(d4)
        # Head at 4S, after bilinear upsampling.
        self.head1, self.head1_bn = conv(d4, h1, 3), FP32StatsBatchNorm2d(h1)
        self.head2, self.head2_bn = conv(h1, h2, 3), FP32StatsBatchNorm2d(h2)
        self.out = conv(h2, cfg.image_channels, 3)

    memory_format: torch.memory_format = torch.contiguous_format
    """Layout the input is put in (``set_memory_format``); every layer's output follows it."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.contiguous(memory_format=self.memory_format)

        def block(layer, norm, x):
            return F.leaky_relu(norm(layer(x)), SLOPE)

        x1 = block(self.enc1, self.enc1_bn, z)
        x2 = block(self.enc2, self.enc2_bn, x1)
        x3 = block(self.enc3, self.enc3_bn, x2)
        x = x3
        for layer, norm in zip(self.mid, self.mid_bn, strict=True):
            x = block(layer, norm, x)
        x = block(self.dec1, self.dec1_bn, torch.cat([x, x3], 1))
        x = block(self.dec2, self.dec2_bn, torch.cat([x, x2], 1))
        x = block(self.dec3, self.dec3_bn, x)
        x = block(self.dec4, self.dec4_bn, x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        x = block(self.head1, self.head1_bn, x)
        x = block(self.head2, self.head2_bn, x)
        return torch.sigmoid(self.out(x))


def set_memory_format(generator: Generator, setting: str, device: torch.device) -> bool:
    """Lay the generator's activations out as ``setting`` says (``train.memory_format``:
    auto = channels_last on a GPU, contiguous on a CPU); returns whether it is channels_last.

    Only the input is converted: convolutions keep the layout of their input, and cuDNN takes
    a channels_last input with weights in either layout (DeepSpeed flattens the weights into
    contiguous buffers, so converting the module would not last)."""
    channels_last = setting == "channels_last" or (setting == "auto" and device.type == "cuda")
    generator.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return channels_last


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
