"""Batched latent nets agree with per-image modules; every preset maps z to its images.
(The ``paper`` preset against the authors' model: test_paper_model.py.)"""

import pytest
import torch

from lcm_dist.config import MODEL_PRESETS, model_from_dict
from lcm_dist.model.generator import Generator, count_parameters
from lcm_dist.model.latent_net import (
    BatchedLatentNet,
    LatentNet,
    clamp_phi_,
    initial_phi,
    make_noise,
    phi_layout,
)


def model_cfg(preset="demo32", **extra):
    return model_from_dict({"preset": preset, **extra})


def test_paper_preset_sizes():
    cfg = model_cfg("paper")
    assert phi_layout(cfg).size == 24_448
    assert make_noise(cfg).shape == (1, 2, 40, 40)
    z = BatchedLatentNet(cfg)(initial_phi(cfg).unsqueeze(0))
    assert z.shape == (1, 64, 32, 32)


def generator_parameters(cfg):
    """The generator's parameter count from its widths: 4x4 convs down, three dilated 3x3 convs
    with two channels per group, 4x4 transposed convs up (two after a skip concatenation),
    three 3x3 convs, and a BatchNorm scale and shift per channel of every layer but the last."""
    (e1, e2, e3), (d1, d2, d3, d4), (h1, h2) = (
        cfg.gen_encoder_widths,
        cfg.gen_decoder_widths,
        cfg.gen_head_widths,
    )
    convs = 16 * (64 * e1 + e1 * e2 + e2 * e3) + 3 * 9 * 2 * e3
    convs += 16 * (2 * e3 * d1 + (d1 + e2) * d2 + d2 * d3 + d3 * d4)
    convs += 9 * (d4 * h1 + h1 * h2 + h2 * 3)
    return convs + 2 * (e1 + e2 + 4 * e3 + d1 + d2 + d3 + d4 + h1 + h2)


@pytest.mark.parametrize(("preset", "z_side"), [("demo32", 8), ("demo64", 16), ("paper", 32)])
def test_presets_map_z_to_image(preset, z_side):
    """Every preset is the same generator topology: z of side S to images of side 4S."""
    cfg = model_cfg(preset)
    assert sorted(MODEL_PRESETS) == ["demo32", "demo64", "paper"]
    gen = Generator(cfg)
    assert count_parameters(gen) == generator_parameters(cfg)
    phi = initial_phi(cfg).repeat(2, 1)
    with torch.no_grad():
        z = BatchedLatentNet(cfg)(phi)
        assert z.shape == (2, 64, z_side, z_side)
        img = gen(z)
    assert img.shape == (2, 3, 4 * z_side, 4 * z_side) == (2, 3, cfg.image_size, cfg.image_size)
    assert float(img.min()) >= 0 and float(img.max()) <= 1


def test_noise_and_initial_phi_are_fixed_by_seed():
    cfg = model_cfg()
    assert torch.equal(make_noise(cfg), make_noise(cfg))
    assert torch.equal(initial_phi(cfg), initial_phi(cfg))
    other = model_cfg(phi_init_seed=1)
    assert not torch.equal(initial_phi(cfg), initial_phi(other))
    s = make_noise(cfg)
    assert float(s.min()) >= 0 and float(s.max()) < cfg.noise_scale


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        # float32: the per-image modules sum gradients in another order; a mean objective (as
        # the training loss is) keeps the gradients at the loss's scale.
        (torch.float32, 1e-5),
        # float64 shows the two computations are the same function, not just close ones.
        (torch.float64, 1e-10),
    ],
)
def test_batched_matches_per_image_modules_forward_and_backward(dtype, tol):
    torch.manual_seed(0)
    cfg = model_cfg()
    layout = phi_layout(cfg)
    b = 5
    # Distinct rows: perturb the conv weights and the norm parameters of each image.
    phi = initial_phi(cfg).repeat(b, 1) + 0.05 * torch.randn(b, layout.size)
    phi = phi.to(dtype).requires_grad_(True)
    batched = BatchedLatentNet(cfg).to(dtype)
    z = batched(phi)
    weights = torch.randn_like(z)
    (z * weights).mean(dim=(1, 2, 3)).sum().backward()

    s = make_noise(cfg).to(dtype)
    for i in range(b):
        net = LatentNet(cfg).to(dtype)
        net.load_phi(phi[i].detach())
        zi = net(s)
        torch.testing.assert_close(zi[0], z[i].detach(), atol=tol, rtol=tol)
        (zi[0] * weights[i]).mean().backward()
        torch.testing.assert_close(net.flat_grad(), phi.grad[i], atol=tol, rtol=tol)


def test_clamp_touches_only_conv_weights():
    cfg = model_cfg()
    layout = phi_layout(cfg)
    phi = torch.full((3, layout.size), 0.5)
    mask = layout.clamp_mask()
    clamp_phi_(phi, mask, cfg.clamp)
    assert torch.all(phi[:, mask] == cfg.clamp)
    assert torch.all(phi[:, ~mask] == 0.5)
    # Conv weights are 24,336 of the 24,448 entries; 112 are normalisation scales/shifts.
    assert int(mask.sum()) == 24_336
    phi = torch.full((1, layout.size), -3.0)
    clamp_phi_(phi, mask, cfg.clamp)
    assert torch.all(phi[:, mask] == -cfg.clamp)


def test_initial_phi_leaves_the_global_random_state_alone():
    """Creating a store computes initial_phi, opening one does not: if it drew from the global
    random state, a run restarted before its first commit would initialise its generator
    differently from a fresh one."""
    from lcm_dist.config import model_from_dict
    from lcm_dist.model.latent_net import initial_phi

    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    initial_phi(model_from_dict({"preset": "demo32"}))
    assert torch.equal(before, torch.get_rng_state())
