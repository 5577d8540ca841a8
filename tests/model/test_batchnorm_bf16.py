"""The generator's BatchNorm keeps its running statistics in float32 under bf16: in bf16 a
running variance near 1 moves in steps of 2^-7, so a momentum-0.1 update smaller than half a
step rounds away and the statistics stall. Eval-mode restoration and the export read them."""

from __future__ import annotations

import torch

from lcm_dist.config import ModelConfig
from lcm_dist.model.generator import Generator


def _train_statistics(bn, variances, steps=200):
    gen = torch.Generator().manual_seed(0)
    std = torch.tensor(variances).sqrt().view(1, -1, 1, 1)
    for _ in range(steps):
        x = torch.randn(64, len(variances), 8, 8, generator=gen) * std
        bn(x.to(next(bn.parameters()).dtype))
    return bn.running_var


def test_running_statistics_follow_the_data_under_bf16():
    generator = Generator(ModelConfig(preset="demo64")).to(torch.bfloat16)
    bn = generator.enc1_bn
    assert bn.weight.dtype == torch.bfloat16  # the layer computes in bf16
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    # Two channels at the true variances, the rest at 1.
    variances = [1.035, 0.965] + [1.0] * (bn.num_features - 2)
    var = _train_statistics(bn, variances)
    # bf16 statistics read 1.000 and 0.980 here; float32 ones follow the data.
    torch.testing.assert_close(var[:2], torch.tensor([1.035, 0.965]), atol=0.01, rtol=0)


def test_casts_move_the_statistics_without_rounding_them_and_keep_the_key_order():
    from lcm_dist.model.generator import FP32StatsBatchNorm2d

    bn = FP32StatsBatchNorm2d(3)
    keys = list(bn.state_dict())
    bn.running_mean.copy_(torch.tensor([1 + 2**-12, -0.3, 0.7]))
    exact = bn.running_mean.clone()
    bn.to(torch.bfloat16)
    assert torch.equal(bn.running_mean, exact) and list(bn.state_dict()) == keys
    bn.to(torch.float64)  # a wide cast takes the statistics along
    assert bn.running_mean.dtype == torch.float64 and bn.weight.dtype == torch.float64
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    assert bn(x).dtype == torch.float64


def test_a_bf16_generator_matches_the_float32_one_closely_in_both_modes():
    cfg = ModelConfig(preset="demo64")
    torch.manual_seed(0)
    wide = Generator(cfg)
    narrow = Generator(cfg)
    narrow.load_state_dict(wide.state_dict())
    narrow.to(torch.bfloat16)
    z = torch.randn(4, 64, 16, 16)
    for mode in (True, False):
        wide.train(mode), narrow.train(mode)
        a, b = wide(z), narrow(z.bfloat16()).float()
        assert (a - b).abs().max() < 0.05
