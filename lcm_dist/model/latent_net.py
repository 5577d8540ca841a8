"""Per-image latent ConvNets f_phi, computed for a whole batch at once.

Every training image i owns a tiny ConvNet f_phi_i that maps the fixed noise tensor s to the
latent tensor z_i fed to the shared generator. Its parameters are stored as one flat row
phi_i of length P (a row of the latent store). ``BatchedLatentNet`` evaluates B such nets in a
single grouped convolution per layer, so the cost is one kernel per layer instead of a Python
loop over images. ``LatentNet`` is the plain per-image ``nn.Module`` it must agree with.

Layout of a phi row, layer by layer: conv weight (C_out, C_in, 3, 3), then for every layer but
the last the normalisation's scale (C_out) and shift (C_out). Every layer, the last included,
ends in a LeakyReLU; the last has no normalisation. The authors' per-image BatchNorm in train
mode over a batch of one image normalises each channel over its spatial extent, which is
instance normalisation with per-image affine parameters; that is what is computed here.

Every phi starts from the same vector: the parameters of ``LatentNet`` built under
``torch.manual_seed(phi_init_seed)`` (PyTorch's default conv init, uniform within
+-1/sqrt(fan_in), well beyond the clamp; normalisation scale 1, shift 0), as the authors build
every image's net. The first clamp after the first step brings the conv weights into range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcm_dist.config import ModelConfig

NORM_EPS = 1e-5


@dataclass(frozen=True)
class PhiSlice:
    """One parameter tensor inside a flat phi row."""

    name: str
    shape: tuple[int, ...]
    offset: int
    clamped: bool

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class PhiLayout:
    """Where each parameter of a latent net lives in its flat phi row."""

    in_channels: int
    widths: tuple[int, ...]
    slices: tuple[PhiSlice, ...]

    @property
    def size(self) -> int:
        last = self.slices[-1]
        return last.offset + last.size

    def clamp_mask(self) -> torch.Tensor:
        """Boolean (P,) mask of the entries that are clamped (the conv weights)."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        for s in self.slices:
            if s.clamped:
                mask[s.offset : s.offset + s.size] = True
        return mask


def phi_layout(cfg: ModelConfig) -> PhiLayout:
    """The flat layout of phi for a model config."""
    slices = []
    offset = 0
    c_in = cfg.noise_channels
    for i, c_out in enumerate(cfg.latent_widths):
        entries = [(f"conv{i}.weight", (c_out, c_in, 3, 3), True)]
        if i < len(cfg.latent_widths) - 1:
            entries += [(f"norm{i}.weight", (c_out,), False), (f"norm{i}.bias", (c_out,), False)]
        for name, shape, clamped in entries:
            s = PhiSlice(name, shape, offset, clamped)
            slices.append(s)
            offset += s.size
        c_in = c_out
    return PhiLayout(cfg.noise_channels, tuple(cfg.latent_widths), tuple(slices))


def make_noise(cfg: ModelConfig) -> torch.Tensor:
    """The fixed noise input s, shape (1, noise_channels, noise_size, noise_size)."""
    gen = torch.Generator().manual_seed(cfg.noise_seed)
    shape = (1, cfg.noise_channels, cfg.noise_size, cfg.noise_size)
    return torch.rand(shape, generator=gen) * cfg.noise_scale


def initial_phi(cfg: ModelConfig) -> torch.Tensor:
    """The (P,) vector every image's phi starts from: the parameters of a ``LatentNet`` as
    PyTorch initialises it right after ``torch.manual_seed(phi_init_seed)`` (its conv layers
    draw their weights in order, the normalisations draw nothing), computed from a private
    generator so that the global random state is untouched."""
    gen = torch.Generator().manual_seed(cfg.phi_init_seed)
    with torch.random.fork_rng(devices=[]):  # building the net draws its default init
        net = LatentNet(cfg)
    with torch.no_grad():
        for layer in net.net:
            if isinstance(layer, nn.Conv2d):
                # What nn.Conv2d.reset_parameters does (uniform within +-1/sqrt(fan_in)).
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def clamp_phi_(phi: torch.Tensor, mask: torch.Tensor, clamp: float) -> torch.Tensor:
    """Clamp the conv-weight entries of a (B, P) phi batch to [-clamp, clamp], in place."""
    with torch.no_grad():
        clamped = phi.clamp(-clamp, clamp)
        phi.copy_(torch.where(mask, clamped, phi))
    return phi


class BatchedLatentNet(nn.Module):
    """Evaluates f_phi_i(s) for a (B, P) batch of phi rows with one grouped conv per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layout = phi_layout(cfg)
        self.slope = cfg.leaky_slope
        self.register_buffer("noise", make_noise(cfg), persistent=False)
        self.register_buffer("mask", self.layout.clamp_mask(), persistent=False)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """Map phi (B, P) to the latent tensors z (B, C_z, H_z, W_z)."""
        b = phi.shape[0]
        x = self.noise.expand(1, -1, -1, -1).repeat(1, b, 1, 1)  # (1, B*C, H, W)
        params = {s.name: phi[:, s.offset : s.offset + s.size] for s in self.layout.slices}
        n_layers = len(self.layout.widths)
        c_in = self.layout.in_channels
        for i, c_out in enumerate(self.layout.widths):
            w = params[f"conv{i}.weight"].reshape(b * c_out, c_in, 3, 3)
            x = F.conv2d(x, w, groups=b)
            if i < n_layers - 1:
                # group_norm with one group per (image, channel) normalises each channel of
                # each image over space, with per-image scale and shift.
                x = F.group_norm(
                    x,
                    b * c_out,
                    params[f"norm{i}.weight"].reshape(-1),
                    params[f"norm{i}.bias"].reshape(-1),
                    NORM_EPS,
                )
            x = F.leaky_relu(x, self.slope)
            c_in = c_out
        return x.reshape(b, c_in, x.shape[-2], x.shape[-1])


class LatentNet(nn.Module):
    """One image's latent net as an ordinary module: the reference for ``BatchedLatentNet``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.noise_channels
        for i, c_out in enumerate(cfg.latent_widths):
            layers.append(nn.Conv2d(c_in, c_out, 3, bias=False))
            if i < len(cfg.latent_widths) - 1:
                # Batch statistics of a batch of one image: normalisation over space.
                layers.append(nn.BatchNorm2d(c_out, eps=NORM_EPS, track_running_stats=False))
            layers.append(nn.LeakyReLU(cfg.leaky_slope))
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)

    def load_phi(self, phi: torch.Tensor) -> None:
        """Copy a flat (P,) phi row into this module's parameters."""
        params = list(self.parameters())
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(phi[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if offset != phi.numel():
            raise ValueError(f"phi has {phi.numel()} entries, this latent net needs {offset}")

    def flat_grad(self) -> torch.Tensor:
        """Gradients of all parameters as one flat (P,) vector in phi layout order."""
        return torch.cat([p.grad.reshape(-1) for p in self.parameters()])
