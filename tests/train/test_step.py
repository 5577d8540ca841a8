"""One training step (``lcm_dist.train.step.fit_batch``) on its own, without DeepSpeed."""

from __future__ import annotations

import torch


def test_an_images_phi_step_and_theta_weight_do_not_depend_on_its_batch_size():
    """What a rank with fewer images does: its batches are smaller, and the loss is scaled by
    the batch's share of a full one, so image x moves by the same phi step and adds the same
    gradient to theta as in a full batch (generator in eval mode: no batch statistics)."""
    from lcm_dist.config import config_from_dict
    from lcm_dist.data.demo import random_crops
    from lcm_dist.model.generator import Generator
    from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi
    from lcm_dist.model.loss import lcm_loss
    from lcm_dist.train.step import fit_batch

    cfg = config_from_dict(
        {
            "run_dir": "unused",
            "data": {"shards": "unused", "batch_size": 4},
            "train": {"max_steps": 1, "inner_steps": 1, "lr_phi": 1.0},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
        }
    )
    torch.manual_seed(0)
    generator = Generator(cfg.model).eval()
    net = BatchedLatentNet(cfg.model)
    import numpy as np

    images = torch.stack(
        [
            torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
            for _, im in random_crops(4, 32)
        ]
    )

    class Engine:
        """The part of a DeepSpeed engine fit_batch uses, on one process; keeps the
        gradient of each step instead of stepping."""

        def __init__(self, module):
            self.module, self.grads = module, []

        def __call__(self, z):
            return self.module(z)

        def backward(self, loss):
            loss.backward()

        def step(self):
            self.grads.append([p.grad.clone() for p in self.module.parameters()])
            self.module.zero_grad()

    def step(batch):
        engine = Engine(generator)
        phi = initial_phi(cfg.model).repeat(len(batch), 1).requires_grad_(True)
        fit_batch(engine, net, phi, images[batch], cfg, net.mask, torch.float32)
        return phi.detach(), engine.grads[0]

    full_phi, full_grads = step([0, 1, 2, 3])
    half_phi, half_grads = step([0, 1])
    start = initial_phi(cfg.model)
    # Equal up to float summation order (a batch of 2 and of 4 reduce in different orders);
    # unscaled, the batch of 2 would step twice as far.
    torch.testing.assert_close(half_phi - start, full_phi[:2] - start, rtol=1e-4, atol=1e-6)
    # theta: each image adds its own loss gradient / data.batch_size, in any batch.
    singles = []
    for i in range(2):
        generator.zero_grad()
        z = net(initial_phi(cfg.model)[None])
        terms = lcm_loss(
            generator(z), images[i : i + 1], cfg.train.lap_levels, cfg.train.mse_weight
        )
        terms["loss"].backward()
        singles.append([p.grad.clone() for p in generator.parameters()])
    for got, a, b in zip(half_grads, *singles, strict=True):
        torch.testing.assert_close(got, (a + b) / 4, rtol=1e-4, atol=1e-7)
