"""What the GPU benchmark (``gpu.py``) measures with: the device's dense bf16 peak, a clock on
the device's timeline, a host-sync counter, and the bare inner step it times (with its time
shares and the slowest layers of its forward pass)."""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings

import torch

PEAK_BF16_TFLOPS = (
    # Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, matched against
    # torch.cuda.get_device_name in this order. --peak-tflops overrides.
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it came from) for ``device``."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS:
            if key in name:
                return value, f"datasheet dense bf16 peak of the {key}"
        return None, f"unknown device {name!r}: give --peak-tflops"
    return None, "a CPU: give --peak-tflops for an MFU"


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the wall clock on a CPU (where
    torch computes synchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def counting_syncs(device: torch.device, counter: list):
    """Appends to ``counter`` the number of host syncs torch reports inside the block (CUDA's
    sync debug mode, 'warn'); appends None on a CPU, where nothing synchronises."""
    if device.type != "cuda":
        yield
        counter.append(None)
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counter.append(sum("synchroniz" in str(w.message) for w in seen))


def syncs_per(counts: list, per: int) -> float | None:
    if not counts or counts[0] is None:
        return None
    return sum(counts) / (len(counts) * per)


class BareStep:
    """One inner step of the paper's recipe, the plainest way: the latent nets and the
    generator on the device, phi and the images there, SGD on theta and phi."""

    def __init__(self, model, batch, precision, device, memory_format="auto", compile_=False):
        from lcm_dist.model.generator import Generator, set_memory_format
        from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi

        torch.manual_seed(0)
        self.model, self.device = model, device
        self.net = BatchedLatentNet(model).to(device)
        self.generator = Generator(model).to(device)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.generator.to(self.dtype)
        set_memory_format(self.generator, memory_format, device)
        self.forward = torch.compile(self.generator) if compile_ else self.generator
        self.optimizer = torch.optim.SGD(self.generator.parameters(), lr=0.01)
        self.phi = initial_phi(model).to(device).repeat(batch, 1).requires_grad_(True)
        gen = torch.Generator().manual_seed(1)
        size = (batch, model.image_channels, model.image_size, model.image_size)
        self.images = torch.rand(size, generator=gen).to(device)

    def __call__(self, clock: Clock | None = None) -> dict | None:
        from lcm_dist.model.latent_net import clamp_phi_
        from lcm_dist.model.loss import lcm_loss

        marks: dict = {}

        def at(name):
            if clock is not None:
                marks[name] = clock.mark()

        def hook(name):
            def record(grad):
                at(name)
                return grad

            return record

        at("start")
        z = self.net(self.phi)
        at("net")
        output = self.forward(z.to(self.dtype)).float()
        at("generator")
        loss = lcm_loss(output, self.images)["loss"]
        at("loss")
        if clock is not None:
            output.register_hook(hook("loss_backward"))
            z.register_hook(hook("generator_backward"))
        loss.backward()
        at("backward")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.phi -= 1.0 * self.phi.grad
            self.phi.grad = None
            clamp_phi_(self.phi, self.net.mask, self.model.clamp)
        at("end")
        if clock is None:
            return None
        return marks


def _shares(clock: Clock, marks: dict) -> dict[str, float]:
    ms = clock.ms
    parts = {
        "latent_nets": ms(marks["start"], marks["net"])
        + ms(marks["generator_backward"], marks["backward"]),
        "generator": ms(marks["net"], marks["generator"])
        + ms(marks["loss_backward"], marks["generator_backward"]),
        "loss": ms(marks["generator"], marks["loss"]) + ms(marks["loss"], marks["loss_backward"]),
        "optimizers": ms(marks["backward"], marks["end"]),
    }
    parts["total"] = ms(marks["start"], marks["end"])
    return parts


def measure_steps(step: BareStep, clock: Clock, warmup: int, repeats: int) -> dict:
    """Median milliseconds of an inner step and of its parts, and the host syncs per step."""
    for _ in range(warmup):
        step()
    clock.sync()
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    parts: list[dict] = []
    syncs: list = []
    for _ in range(repeats):
        with counting_syncs(step.device, syncs):
            marks = step(clock)
        clock.sync()
        parts.append(_shares(clock, marks))
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    out = {"inner_step_ms": round(med["total"], 3)}
    out["share"] = {k: round(v / med["total"], 3) for k, v in med.items() if k != "total"}
    out["host_syncs_per_inner_step"] = syncs_per(syncs, 1)
    return out


def layer_forward_ms(step: BareStep, clock: Clock, repeats: int) -> dict[str, float]:
    """Median forward milliseconds of each layer of the generator (its convolutions and
    normalisations, by forward hooks), the ten slowest, slowest first: where the forward pass
    spends its time, for the MFU."""
    marks: dict[str, list] = {}
    handles = []
    for name, module in step.generator.named_modules():
        if not list(module.children()):  # leaf layers
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, i, name=name: marks.setdefault(name, []).append([clock.mark()])
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: marks[name][-1].append(clock.mark())
                )
            )
    try:
        for _ in range(repeats):
            step()
        clock.sync()
    finally:
        for handle in handles:
            handle.remove()
    ms = {
        name: statistics.median(clock.ms(a, b) for a, b in pairs) for name, pairs in marks.items()
    }
    slowest = sorted(ms.items(), key=lambda kv: -kv[1])[:10]
    return {name: round(value, 3) for name, value in slowest}
