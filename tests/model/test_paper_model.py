"""The ``paper`` preset against the authors' model as REFERENCE facts describe it: generator layers,
sizes and FLOPs, the latent nets and their init, the clamp, the loss and the inpainting ring."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lcm_dist.config import model_from_dict
from lcm_dist.model.generator import Generator, count_parameters
from lcm_dist.model.latent_net import (
    BatchedLatentNet,
    clamp_phi_,
    initial_phi,
    make_noise,
    phi_layout,
)
from lcm_dist.model.loss import blur_kernel, lcm_loss
from lcm_dist.restore.degrade import Inpaint, box_mask

PAPER = model_from_dict({"preset": "paper"})

# (module name, parameters of its conv, output shape for one 64x32x32 z), in forward order.
PAPER_LAYERS = [
    ("enc1", 64 * 256 * 16, (256, 16, 16)),
    ("enc2", 256 * 512 * 16, (512, 8, 8)),
    ("enc3", 512 * 1024 * 16, (1024, 4, 4)),
    ("mid.0", 1024 * 2 * 9, (1024, 4, 4)),
    ("mid.1", 1024 * 2 * 9, (1024, 4, 4)),
    ("mid.2", 1024 * 2 * 9, (1024, 4, 4)),
    ("dec1", 2048 * 512 * 16, (512, 8, 8)),
    ("dec2", 1024 * 512 * 16, (512, 16, 16)),
    ("dec3", 512 * 256 * 16, (256, 32, 32)),
    ("dec4", 256 * 128 * 16, (128, 64, 64)),
    ("head1", 128 * 64 * 9, (64, 128, 128)),
    ("head2", 64 * 32 * 9, (32, 128, 128)),
    ("out", 32 * 3 * 9, (3, 128, 128)),
]


def test_paper_generator_layers_and_parameter_counts():
    gen = Generator(PAPER)
    modules = dict(gen.named_modules())
    shapes = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name, _, _ in PAPER_LAYERS
    ]
    with torch.no_grad():
        image = gen.eval()(torch.rand(1, 64, 32, 32))
    for h in hooks:
        h.remove()
    assert image.shape == (1, 3, 128, 128)
    norms = 0
    for name, conv_params, shape in PAPER_LAYERS:
        layer = modules[name]
        assert layer.bias is None, name
        assert layer.weight.numel() == conv_params, name
        assert shapes[name] == shape, name
        if name != "out":  # every layer but the last has a BatchNorm of its width
            norm = modules[name.replace(".", "_bn.") if "." in name else name + "_bn"]
            assert isinstance(norm, nn.BatchNorm2d) and norm.num_features == shape[0], name
            norms += shape[0]
    assert isinstance(gen.dec1, nn.ConvTranspose2d) and gen.dec1.weight.numel() == 16_777_216
    assert all(m.groups == 512 and m.dilation == (2, 2) for m in gen.mid)
    assert count_parameters(gen) == 38_696_224
    assert (
        sum(p.numel() for p in gen.parameters()) == sum(c for _, c, _ in PAPER_LAYERS) + 2 * norms
    )
    running = sum(b.numel() for n, b in gen.named_buffers() if "running_" in n)
    assert running == 12_736


def test_paper_generator_flops():
    gen = Generator(PAPER).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gen(torch.rand(1, 64, 32, 32))
    assert round(counter.get_total_flops() / 1e9, 2) == 7.48
    net = BatchedLatentNet(PAPER)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(initial_phi(PAPER)[None])
    assert round(counter.get_total_flops() / 1e9, 2) == 0.05


def test_paper_generator_batchnorm_train_and_eval():
    """Training normalises over the batch (an image's output depends on the others); eval mode
    uses the running statistics (it does not), and training updates them."""
    cfg = model_from_dict({"preset": "demo32"})
    gen = Generator(cfg)
    z = torch.rand(4, 64, 8, 8)
    with torch.no_grad():
        together = gen(z)[:2]
        assert not torch.allclose(together, gen(z[:2]), atol=1e-4)
        assert int(gen.enc1_bn.num_batches_tracked) == 2
        assert not torch.equal(gen.enc1_bn.running_mean, torch.zeros(64))
        gen.eval()
        torch.testing.assert_close(gen(z)[:2], gen(z[:2]))


class AuthorsLatentNet(nn.Module):
    """One image's latent net written as the authors' code builds it: four 3x3 valid convs
    without bias, BatchNorm on all but the last, LeakyReLU(0.2) after all four."""

    def __init__(self):
        super().__init__()
        widths = [2, 8, 16, 32, 64]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(4):
            self.convs.append(nn.Conv2d(widths[i], widths[i + 1], 3, 1, 0, 1, bias=False))
            if i < 3:
                self.norms.append(nn.BatchNorm2d(widths[i + 1]))

    def forward(self, s):
        x = s
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < 3:
                x = self.norms[i](x)
            x = F.leaky_relu(x, 0.2)
        return x

    def flat(self):
        """Parameters in phi's layout: conv weight, then the norm's scale and shift."""
        parts = []
        for i, conv in enumerate(self.convs):
            parts.append(conv.weight.reshape(-1))
            if i < 3:
                parts += [self.norms[i].weight, self.norms[i].bias]
        return torch.cat(parts)

    def restrict(self, value):
        for conv in self.convs:
            conv.weight.data.clamp_(-value, value)


def authors_nets(count):
    nets = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(count):
            torch.manual_seed(42)
            nets.append(AuthorsLatentNet())
    return nets


def test_paper_noise_and_initial_phi_are_the_authors_seed_42_draws():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        s = torch.zeros(1, 2, 40, 40).uniform_() * 0.1
    assert torch.equal(make_noise(PAPER), s)
    net = authors_nets(1)[0]
    phi = initial_phi(PAPER)
    assert torch.equal(phi, net.flat().detach())
    layout = phi_layout(PAPER)
    assert phi.numel() == layout.size == 24_448
    # PyTorch's default conv init is far beyond the clamp: bound 1/sqrt(fan_in) per layer.
    for sl, fan_in in zip([s for s in layout.slices if s.clamped], (18, 72, 144, 288), strict=True):
        w = phi[sl.offset : sl.offset + sl.size]
        bound = 1 / math.sqrt(fan_in)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    scales = [s for s in layout.slices if s.name.endswith("norm0.weight")][0]
    assert torch.all(phi[scales.offset : scales.offset + scales.size] == 1)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_paper_batched_latent_nets_match_one_authors_module_per_image(dtype, tol):
    """Two joint SGD steps with the clamp: the batched nets and one authors-style module per
    image (train mode, batch of one) agree on z, on the gradients and on the clamped phi."""
    b, lr = 3, 1.0
    gen = torch.Generator().manual_seed(0)
    net = BatchedLatentNet(PAPER).to(dtype)
    modules = [m.to(dtype) for m in authors_nets(b)]
    phi = initial_phi(PAPER).to(dtype).repeat(b, 1).requires_grad_(True)
    s = make_noise(PAPER).to(dtype)
    targets = torch.rand(b, 64, 32, 32, generator=gen, dtype=torch.float64).to(dtype)
    for _ in range(2):
        z = net(phi)
        ((z - targets) ** 2).mean().backward()
        zs = torch.cat([m(s) for m in modules])
        ((zs - targets) ** 2).mean().backward()
        torch.testing.assert_close(z.detach(), zs.detach(), atol=tol, rtol=tol)
        with torch.no_grad():
            for i, m in enumerate(modules):
                grad = torch.cat(
                    [
                        p.grad.reshape(-1)
                        for conv, norm in zip(m.convs, [*m.norms, None], strict=True)
                        for p in ([conv.weight] + ([norm.weight, norm.bias] if norm else []))
                    ]
                )
                torch.testing.assert_close(phi.grad[i], grad, atol=tol, rtol=tol)
                for p in m.parameters():
                    p -= lr * p.grad
                    p.grad = None
                m.restrict(PAPER.clamp)
            phi -= lr * phi.grad
            phi.grad = None
            clamp_phi_(phi, net.mask, PAPER.clamp)
        for i, m in enumerate(modules):
            torch.testing.assert_close(phi[i].detach(), m.flat().detach(), atol=tol, rtol=tol)


def test_paper_clamp_touches_conv_weights_only():
    layout = phi_layout(PAPER)
    mask = layout.clamp_mask()
    assert int(mask.sum()) == 24_336  # conv weights; 112 normalisation scales and shifts
    phi = initial_phi(PAPER).repeat(2, 1)
    phi[:, ~mask] = torch.linspace(-2, 2, int((~mask).sum()))
    before = phi.clone()
    clamp_phi_(phi, mask, PAPER.clamp)
    assert torch.equal(phi[:, ~mask], before[:, ~mask])
    torch.testing.assert_close(phi[:, mask], before[:, mask].clamp(-0.01, 0.01), rtol=0, atol=0)
    # The default init (uniform within +-1/sqrt(fan_in)) is mostly beyond the clamp: the first
    # clamp puts a fraction 1 - 0.01 * sqrt(fan_in) of each layer's weights at +-0.01.
    layers = [(18, 2 * 8 * 9), (72, 8 * 16 * 9), (144, 16 * 32 * 9), (288, 32 * 64 * 9)]
    expected = sum(n * (1 - 0.01 * math.sqrt(f)) for f, n in layers) / 24_336
    at_clamp = float((phi[:, mask].abs() == PAPER.clamp).float().mean())
    assert abs(at_clamp - expected) < 0.01 and at_clamp > 0.8


def loop_blur(x):
    """The 5x5 blur written out: k[i, j] = g(i) + g(j), g(t) = exp(-(t-2)^2/4), normalised;
    every output pixel sums its 5x5 neighbourhood, pixels outside the image count as 0."""
    g = [math.exp(-((t - 2) ** 2) / 4) for t in range(5)]
    k = [[g[i] + g[j] for j in range(5)] for i in range(5)]
    total = sum(map(sum, k))
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for r in range(h):
        for c in range(w):
            acc = torch.zeros(x.shape[:2], dtype=x.dtype)
            for i in range(5):
                for j in range(5):
                    rr, cc = r + i - 2, c + j - 2
                    if 0 <= rr < h and 0 <= cc < w:
                        acc += k[i][j] / total * x[:, :, rr, cc]
            out[:, :, r, c] = acc
    return out


def loop_lap_l1(x, y, max_levels=3):
    def pyramid(img):
        terms, current = [], img
        for _ in range(max_levels):
            low = loop_blur(current)
            terms.append(current - low)
            current = F.avg_pool2d(low, 2)
        return [*terms, current]

    return sum(
        2 ** (-2 * i) * (a - b).abs().mean()
        for i, (a, b) in enumerate(zip(pyramid(x), pyramid(y), strict=True))
    )


def test_paper_loss_matches_a_loop_over_the_kernel():
    k = blur_kernel()
    assert round(float(k[2, 2]), 3) == 0.061 and round(float(k[0, 0]), 3) == 0.022
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    expected = loop_lap_l1(x, y) + ((x - y) ** 2).mean()
    terms = lcm_loss(x, y, levels=4, mse_weight=1.0)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["lap_l1"], loop_lap_l1(x, y), rtol=1e-10, atol=0)
    per_image = lcm_loss(x, y, reduction="none")["loss"]
    torch.testing.assert_close(
        per_image[1], loop_lap_l1(x[1:], y[1:]) + ((x[1] - y[1]) ** 2).mean()
    )


def test_paper_inpainting_ring_weight():
    """The authors' inpainting loss: Lap-L1 of the masked images plus MSE of the masked images
    multiplied by 5 on the hole grown by 5 pixels (and 1 elsewhere)."""
    size, hole = 32, 10
    known = box_mask(size, hole / size)
    start = (size - hole) // 2
    assert torch.all(known[0, 0, start : start + hole, start : start + hole] == 0)
    w = torch.ones(1, 1, size, size)
    w[..., max(0, start - 5) : start + hole + 5, max(0, start - 5) : start + hole + 5] = 5.0
    op = Inpaint(known, ring_weight=5, ring_width=5)
    torch.testing.assert_close(op.pixel_weight(), w)
    gen = torch.Generator().manual_seed(1)
    x_hat = torch.rand(2, 3, size, size, generator=gen, dtype=torch.float64)
    clean = torch.rand(2, 3, size, size, generator=gen, dtype=torch.float64)
    y = op(clean)
    known64 = known.double()
    for i in range(2):
        a, b = known64 * x_hat[i : i + 1], known64 * clean[i : i + 1]
        expected = loop_lap_l1(a, b) + ((w * a - w * b) ** 2).mean()
        torch.testing.assert_close(op.data_term(x_hat, y)[i], expected, rtol=1e-10, atol=0)
    plain = Inpaint(known).data_term(x_hat, y)
    assert torch.all(op.data_term(x_hat, y) > plain)


def _first_phi_gradient(preset: str) -> float:
    """Norm of phi's gradient at the first step of a batch of four fresh images (every phi the
    initial one, so every z is the same) through an untrained generator in train mode."""
    model = model_from_dict({"preset": preset})
    torch.manual_seed(0)
    gen, net = Generator(model), BatchedLatentNet(model)
    phi = initial_phi(model).expand(4, -1).clone().requires_grad_(True)
    images = torch.rand(4, 3, model.image_size, model.image_size)
    lcm_loss(gen(net(phi)), images)["loss"].backward()
    return float(phi.grad.norm())


def test_a_1x1_bottleneck_cannot_train_fresh_latents():
    """A batch of fresh latents is one z repeated. With 2x2 or larger inner maps BatchNorm still
    sees spatial variance and phi's first gradient is moderate; at 1x1 (demo32) the variance is
    zero, every inner BatchNorm multiplies the gradient by 1/sqrt(eps) and phi is thrown ~1e4
    times beyond the scale of z (why trained models and fixtures use demo64 or larger)."""
    from lcm_dist.config import bottleneck_side

    assert [bottleneck_side(model_from_dict({"preset": p})) for p in ("paper", "demo64")] == [4, 2]
    assert bottleneck_side(model_from_dict({"preset": "demo32"})) == 1
    moderate = _first_phi_gradient("demo64")
    assert moderate < 10
    assert _first_phi_gradient("demo32") > 1e4 * moderate
