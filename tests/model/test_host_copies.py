"""An inner step of training and of restoration copies nothing from the host to the device.

On a GPU such a copy (a constant built or moved in the step, from pageable memory) makes the
host wait for the device, so the steps no longer queue ahead of it. Without a GPU the steps run
on the ``meta`` device, where every tensor computed is a shape only, and a
``TorchFunctionMode`` records each call that takes host data to it. On a GPU,
``tests/test_gpu.py`` runs the same steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lcm_dist.config import config_from_dict
from lcm_dist.model.generator import Generator
from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi

META = torch.device("meta")
FROM_HOST_DATA = {"tensor", "as_tensor", "from_numpy", "asarray"}


class HostToDevice(TorchFunctionMode):
    """Records the torch calls that bring host data to a non-CPU device."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        to_device = any(o.device.type != "cpu" for o in outputs)
        from_host = any(i.device.type == "cpu" and i.dim() > 0 for i in inputs)
        if to_device and (from_host or name in FROM_HOST_DATA):
            self.calls.append(name)
        return out


def _cfg(**train):
    return config_from_dict(
        {
            "run_dir": "unused",
            "model": {"preset": "demo64"},
            "data": {"shards": "unused", "batch_size": 2},
            "train": {"max_steps": 1, "inner_steps": 2, **train},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}},
        }
    )


class PlainEngine:
    """What ``fit_batch`` uses of a DeepSpeed engine: forward, backward, step."""

    def __init__(self, generator):
        self.module = generator
        self.optimizer = torch.optim.SGD(generator.parameters(), lr=0.1, momentum=0.9)

    def __call__(self, z):
        return self.module(z)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def test_the_mode_sees_a_constant_copied_to_the_device():
    with HostToDevice() as seen:
        torch.tensor([0.1, 0.2], device=META)
        torch.ones(3).to(META)
        torch.zeros(3, device=META).copy_(torch.ones(3))
        torch.zeros(3, device=META) * 2.0  # a Python scalar is no copy
    assert seen.calls == ["tensor", "to", "copy_"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_inner_step_copies_nothing_to_the_device(dtype):
    from lcm_dist.train.step import fit_batch

    cfg = _cfg()
    net = BatchedLatentNet(cfg.model).to(META)
    engine = PlainEngine(Generator(cfg.model).to(META).to(dtype))
    phi = initial_phi(cfg.model).to(META).repeat(2, 1).requires_grad_(True)
    images = torch.empty(2, 3, 64, 64, device=META)
    fit_batch(engine, net, phi, images, cfg, net.mask, dtype)  # first use copies constants once
    with HostToDevice() as seen:
        fit_batch(engine, net, phi, images, cfg, net.mask, dtype)
    assert seen.calls == []


@pytest.mark.parametrize("task", ["inpaint", "superres", "colorize"])
def test_a_restoration_iteration_copies_nothing_to_the_device(task):
    from lcm_dist.restore.degrade import make_operator
    from lcm_dist.restore.fit import FitState, fit_settings
    from lcm_dist.restore.model import RestorationModel

    cfg = _cfg()
    model = RestorationModel(
        url="(test)",
        attrs={},
        model=cfg.model,
        generator=Generator(cfg.model).eval().requires_grad_(False),
        net=BatchedLatentNet(cfg.model),
        initial_phi=initial_phi(cfg.model),
        group=None,
    ).to(META)
    ring = {"ring_weight": 2.0, "ring_width": 2} if task == "inpaint" else {}
    op = make_operator(task, 64, 2, **ring).to(META)
    observed = op(torch.empty(2, 3, 64, 64, device=META))
    state = FitState(model, 2, *fit_settings(task))
    state.step(observed, op)  # the first iteration may set things up
    with HostToDevice() as seen:
        for _ in range(2):
            state.step(observed, op)
    assert seen.calls == []
