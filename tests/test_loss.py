"""The Lap-L1 + MSE loss on examples small enough to check by hand."""

import torch

from lcm_dist.loss import laplacian_l1, laplacian_pyramid, lcm_loss


def test_one_level_is_mean_l1():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = torch.zeros_like(x)
    assert laplacian_l1(x, y, levels=1).item() == 1.5


def test_hand_computed_two_levels():
    # x = [[0, 1], [2, 3]], y = 0. Level 1 (low-pass) is the 2x2 mean 1.5; level 0 is
    # x - 1.5 = [[-1.5, -0.5], [0.5, 1.5]], mean |.| = 1.0. Lap-L1 = 1.0 + 1.5 / 4 = 1.375.
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = torch.zeros_like(x)
    assert torch.isclose(laplacian_l1(x, y, levels=2), torch.tensor(1.375))
    # MSE = (0 + 1 + 4 + 9) / 4 = 3.5; total with weight 0.5 = 1.375 + 1.75.
    terms = lcm_loss(x, y, levels=2, mse_weight=0.5)
    assert torch.isclose(terms["mse"], torch.tensor(3.5))
    assert torch.isclose(terms["loss"], torch.tensor(1.375 + 1.75))


def test_constant_offset_lands_in_the_last_level():
    x = torch.full((2, 3, 16, 16), 0.25)
    y = torch.zeros_like(x)
    # Band-pass levels of a constant are 0; the residual (level 3) weighs 2^-6.
    assert torch.isclose(laplacian_l1(x, y, levels=4), torch.tensor(0.25 / 64))


def test_bands_reconstruct_the_image():
    x = torch.rand(2, 3, 16, 16)
    bands = laplacian_pyramid(x, 4)
    rebuilt = bands[-1]
    for band in reversed(bands[:-1]):
        rebuilt = band + torch.nn.functional.interpolate(rebuilt, scale_factor=2, mode="nearest")
    torch.testing.assert_close(rebuilt, x)


def test_per_image_reduction():
    x = torch.rand(3, 3, 8, 8)
    y = torch.rand(3, 3, 8, 8)
    per = lcm_loss(x, y, reduction="none")
    assert per["loss"].shape == (3,)
    torch.testing.assert_close(per["loss"].mean(), lcm_loss(x, y)["loss"])
    assert lcm_loss(x, x)["loss"].item() == 0.0
