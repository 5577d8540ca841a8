"""The Lap-L1 + MSE loss on small examples. (Against a loop over the authors' kernel:
test_paper_model.py.)"""

import torch

from lcm_dist.model.loss import blur, blur_kernel, laplacian_l1, laplacian_pyramid, lcm_loss


def test_one_level_is_mean_l1():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = torch.zeros_like(x)
    assert laplacian_l1(x, y, levels=1).item() == 1.5


def test_terms_and_mse_weight():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = torch.zeros_like(x)
    terms = lcm_loss(x, y, levels=2, mse_weight=0.5)
    # MSE = (0 + 1 + 4 + 9) / 4 = 3.5; the total is Lap-L1 + 0.5 * MSE.
    assert torch.isclose(terms["mse"], torch.tensor(3.5))
    assert torch.isclose(terms["loss"], terms["lap_l1"] + 1.75)
    # Two terms: the band x - blur(x) (mean L1) and a quarter of the 2x2 mean of blur(x).
    low = blur(x)
    expected = (x - low).abs().mean() + low.mean() / 4
    assert torch.isclose(terms["lap_l1"], expected)


def test_blur_pads_with_zeros():
    k = blur_kernel()
    assert torch.isclose(k.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(k, k.T)
    out = blur(torch.ones(1, 2, 9, 9))
    # Inside, a constant stays constant; at a corner only the kernel's 3x3 quadrant is summed.
    assert torch.isclose(out[0, 0, 4, 4], torch.tensor(1.0))
    assert torch.isclose(out[0, 1, 0, 0], k[2:, 2:].sum().float())
    # So a constant image's band-pass terms vanish away from the border only.
    band = laplacian_pyramid(torch.full((1, 1, 16, 16), 0.25), 2)[0]
    assert torch.all(band[..., 2:-2, 2:-2].abs() < 1e-7) and float(band[..., 0, 0]) > 0.05


def test_pyramid_is_linear():
    """laplacian_l1 takes the pyramid of x - y, which is the difference of the pyramids."""
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    for a, b, d in zip(
        laplacian_pyramid(x, 4), laplacian_pyramid(y, 4), laplacian_pyramid(x - y, 4), strict=True
    ):
        torch.testing.assert_close(a - b, d)
    assert [t.shape[-1] for t in laplacian_pyramid(x, 4)] == [16, 8, 4, 2]


def test_per_image_reduction():
    x = torch.rand(3, 3, 8, 8)
    y = torch.rand(3, 3, 8, 8)
    per = lcm_loss(x, y, reduction="none")
    assert per["loss"].shape == (3,)
    torch.testing.assert_close(per["loss"].mean(), lcm_loss(x, y)["loss"])
    assert lcm_loss(x, x)["loss"].item() == 0.0
