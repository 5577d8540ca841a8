"""Batched latent nets vs a Python loop over per-image modules, forward + backward."""

from __future__ import annotations

import statistics
import time

import torch

from lcm_dist.config import MODEL_PRESETS, ModelConfig
from lcm_dist.model.latent_net import (
    BatchedLatentNet,
    LatentNet,
    initial_phi,
    make_noise,
    phi_layout,
)


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a named preset, without going through a run config."""
    preset = {k: tuple(v) if isinstance(v, list) else v for k, v in MODEL_PRESETS[name].items()}
    return ModelConfig(preset=name, **preset)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latent_flops(cfg: ModelConfig) -> int:
    """Multiply-add FLOPs (x2) of one latent net's forward + backward pass.

    Backward costs two convolutions per layer (input and weight gradients) except the first
    layer, whose input (the fixed noise) needs no gradient.
    """
    total, side, c_in = 0, cfg.noise_size, cfg.noise_channels
    for i, c_out in enumerate(cfg.latent_widths):
        side -= 2
        fwd = 2 * c_out * c_in * 9 * side * side
        total += fwd * (2 if i == 0 else 3)
        c_in = c_out
    return total


def _measure(cfg: ModelConfig, batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    p = phi_layout(cfg).size
    phi = initial_phi(cfg).repeat(batch, 1) + 0.001 * torch.randn(batch, p)
    z_side = cfg.noise_size - 2 * len(cfg.latent_widths)
    weights = torch.randn(batch, cfg.latent_widths[-1], z_side, z_side)

    batched = BatchedLatentNet(cfg)

    def run_batched():
        x = phi.clone().requires_grad_(True)
        (batched(x) * weights).mean(dim=(1, 2, 3)).sum().backward()

    s = make_noise(cfg)
    nets = []
    for i in range(batch):
        net = LatentNet(cfg)
        net.load_phi(phi[i])
        nets.append(net)

    def run_loop():
        for i, net in enumerate(nets):
            net.zero_grad(set_to_none=True)
            (net(s)[0] * weights[i]).mean().backward()

    # Interleave the two so that load from other processes hits both alike.
    t_batched, t_loop = [], []
    for _ in range(repeats):
        t_batched.append(_time(run_batched, 1))
        t_loop.append(_time(run_loop, 1))
    return statistics.median(t_loop), statistics.median(t_batched)


def bench_latent(batch: int = 64, repeats: int = 7) -> dict:
    """Median forward+backward time of B latent nets, batched vs one module per image.

    ``speedup`` is for the paper's latent net (2x40x40 noise to a 64x32x32 z); the CPU
    testbed's demo32 preset (16x16 noise to 64x8x8) is reported as ``speedup_demo32``.
    """
    result = {"benchmark": "latent", "batch": batch, "threads": torch.get_num_threads()}
    for name, suffix in (("paper", ""), ("demo32", "_demo32")):
        cfg = preset_config(name)
        t_loop, t_batched = _measure(cfg, batch, repeats)
        result[f"loop_seconds{suffix}"] = round(t_loop, 5)
        result[f"batched_seconds{suffix}"] = round(t_batched, 5)
        result[f"speedup{suffix}"] = round(t_loop / t_batched, 2)
        # Achieved arithmetic rate: how close each side is to what the cores can do at all.
        gflop = latent_flops(cfg) * batch / 1e9
        result[f"batched_gflops{suffix}"] = round(gflop / t_batched, 1)
        result[f"loop_gflops{suffix}"] = round(gflop / t_loop, 1)
    result["phi_per_image"] = phi_layout(preset_config("paper")).size
    return result
