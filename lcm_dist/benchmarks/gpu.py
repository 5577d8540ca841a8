"""The paper's model on one accelerator: what an inner step achieves and where its time goes.

``python launch/bench.py gpu`` runs the ``paper`` preset (128 px) on this machine's first GPU
(or its CPU) for per-process batches of 10 (the paper's) and the one ``configs/big.json`` ships
(the planner's), with the generator in fp32 (TF32 convolutions on GPUs) and in bf16:

* ``steps``: image-inner-steps per second, TFLOP/s (the product's own FLOP count,
  ``planning.cost.model_cost``), MFU against the device's dense bf16 peak, peak device memory,
  the share of an inner step spent in the latent nets, the generator, the loss and the
  optimizers (forward and backward of each; marks recorded by CUDA events, and inside the
  backward pass by gradient hooks), and the host syncs per inner step
  (``torch.cuda.set_sync_debug_mode``; on a CPU there is no such thing: null), and for bf16 at
  the planner's batch the ten slowest layers of the generator's forward pass;
* ``layout``: the bf16 step at the planner's batch with contiguous and channels_last
  activations, with cuDNN's autotuner, and compiled (``torch.compile``);
* ``trainer``: the trainer's batch (``Trainer.step``: shards, the latent store, DeepSpeed with
  big.json's section) against a bare loop of the same modules with phi and the images kept on
  the device, the host syncs of its inner steps, and the latent paging: the store's reads and
  write-backs on the step's path, against phi kept on the device;
* ``restoration``: images per second of a 500-iteration fit of a batch of 256 (the restoration
  fit, ``restore.fit.FitState``, with its host syncs per iteration), and DIP's seconds per image
  at 500 iterations.

``--quick`` runs every part with the ``demo32`` model and tiny sizes, so that the test suite
checks on a CPU that the benchmark runs and reports the fields a GPU run reports. Timed on a GPU
with CUDA events after warm-up; the medians are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

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
GOALS = {
    "mfu_bf16_planner_batch": ">= 0.35",
    "trainer_vs_bare": "<= 1.05",
    "paging_vs_on_device": "<= 1.02",
}


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


def _syncs_per(counts: list, per: int) -> float | None:
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
    out["host_syncs_per_inner_step"] = _syncs_per(syncs, 1)
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


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def _big_config() -> dict:
    return json.loads((REPO / "configs" / "big.json").read_text())


def bench_steps(model, batches, device, clock, flops, peak, warmup, repeats) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        for batch in batches:
            step = BareStep(model, batch, precision, device)
            r = measure_steps(step, clock, warmup, repeats)
            rate = batch / (r["inner_step_ms"] / 1000)
            tflops = flops * rate / 1e12
            out[f"{precision}_b{batch}"] = {
                "precision": precision,
                "batch": batch,
                "image_inner_steps_per_s": _sig(rate),
                "tflops": _sig(tflops),
                "mfu": _sig(tflops / peak) if peak else None,
                "peak_memory_gb": _peak_gb(device),
                **r,
            }
            if precision == "bf16" and batch == batches[-1]:
                out[f"{precision}_b{batch}"]["generator_forward_layers_ms"] = layer_forward_ms(
                    step, clock, repeats
                )
            del step
    return out


def bench_layout(model, batch, device, clock, warmup, repeats, deadline) -> dict:
    """The bf16 step at ``batch`` under each layout and kernel choice."""
    out: dict = {}
    variants = [
        ("contiguous", dict(memory_format="contiguous"), False),
        ("channels_last", dict(memory_format="channels_last"), False),
        ("channels_last_cudnn_benchmark", dict(memory_format="channels_last"), True),
    ]
    for name, kwargs, autotune in variants:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = autotune
        step = BareStep(model, batch, "bf16", device, **kwargs)
        out[f"{name}_ms"] = measure_steps(step, clock, warmup, repeats)["inner_step_ms"]
        del step
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    out["compiled_ms"] = out["compile_seconds"] = None
    if time.monotonic() < deadline:
        try:
            start = time.perf_counter()
            step = BareStep(model, batch, "bf16", device, "channels_last", compile_=True)
            step()  # compiles forward and backward
            clock.sync()
            out["compile_seconds"] = round(time.perf_counter() - start, 1)
            out["compiled_ms"] = measure_steps(step, clock, warmup, repeats)["inner_step_ms"]
        except Exception as err:  # a missing compiler is a result, not a crash
            out["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    else:
        out["compile_error"] = "skipped (--quick, or the benchmark's time budget was spent)"
    return out


def _trainer_config(tmp: str, shards: str, preset: str, batch: int, inner: int) -> dict:
    ds = dict(_big_config()["deepspeed"])
    if not torch.cuda.is_available():
        ds.pop("bf16", None)  # DeepSpeed's CPU accelerator: fp32 (bf16 is measured on GPUs)
    return {
        "run_dir": os.path.join(tmp, "run"),
        "model": {"preset": preset},
        "data": {"shards": shards, "batch_size": batch, "num_workers": 2, "shuffle_buffer": 0},
        "train": {"max_steps": 10**6, "inner_steps": inner, "lr_phi": 1.0},
        "checkpoint": {"every_steps": 0},
        "log": {"every_steps": 10**6, "image_every_steps": 0, "progress": False},
        "deepspeed": ds,
    }


def bench_trainer(model, batch, inner, device, clock, rounds) -> dict:
    """The trainer's batch against the bare loop's, alternating, and the trainer's paging."""
    from lcm_dist.config import config_from_dict
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards
    from lcm_dist.train import trainer as trainer_module

    warmup = 2
    with tempfile.TemporaryDirectory(prefix="lcm-bench-gpu-") as tmp:
        shards = os.path.join(tmp, "shards")
        count = batch * (warmup + rounds + 1)
        write_shards(
            random_crops(count, model.image_size, seed=3),
            shards,
            model.image_size,
            max(batch, count // 8),
            progress=False,
        )
        cfg = config_from_dict(
            _trainer_config(tmp, shards, model.preset, batch, inner), "benchmark config"
        )
        trainer = trainer_module.Trainer(cfg)
        precision = "bf16" if trainer.gen_dtype == torch.bfloat16 else "fp32"
        bare = BareStep(model, batch, precision, device)
        syncs: list = []
        plain = trainer_module.fit_batch

        def counted(*args, **kwargs):
            with counting_syncs(device, syncs):
                return plain(*args, **kwargs)

        times: dict[str, list[float]] = {"trainer": [], "bare": [], "paging": []}
        try:
            for i in range(warmup + rounds):
                trainer.clock.reset()
                clock.sync()
                start = time.perf_counter()
                if i >= warmup:
                    trainer_module.fit_batch = counted
                try:
                    trainer.step(i + 1)
                finally:
                    trainer_module.fit_batch = plain
                clock.sync()
                middle = time.perf_counter()
                for _ in range(inner):
                    bare()
                clock.sync()
                end = time.perf_counter()
                if i >= warmup:
                    host = trainer.clock.host
                    times["trainer"].append(middle - start)
                    times["bare"].append(end - middle)
                    times["paging"].append(host["store_wait"] + host["write_back"])
        finally:
            trainer.close_loader()
        trainer.close(warmup + rounds)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "precision": precision,
        "batch": batch,
        "inner_steps": inner,
        "zero_stage": cfg.deepspeed.get("zero_optimization", {}).get("stage", 0),
        "trainer_ms_per_batch": round(ms["trainer"], 2),
        "bare_ms_per_batch": round(ms["bare"], 2),
        "trainer_vs_bare": round(ms["trainer"] / ms["bare"], 4),
        "host_syncs_per_inner_step": _syncs_per(syncs, inner),
        "latent_paging_ms_per_batch": round(ms["paging"], 3),
        "latent_paging_share": round(ms["paging"] / ms["trainer"], 4),
        "paging_vs_on_device": round(ms["trainer"] / (ms["trainer"] - ms["paging"]), 4),
    }


def bench_restoration(model, batch, iterations, dip_iterations, device, clock, deadline) -> dict:
    """A restoration fit (a fresh phi per image, the generator frozen in eval mode) of
    ``batch`` images, and DIP on one image."""
    from lcm_dist.evaluate.baselines import dip_restore
    from lcm_dist.model.generator import Generator
    from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi
    from lcm_dist.restore.degrade import SuperRes
    from lcm_dist.restore.fit import FitState, fit_settings
    from lcm_dist.restore.model import RestorationModel

    torch.manual_seed(0)
    restoration = RestorationModel(
        url="(benchmark)",
        attrs={},
        model=model,
        generator=Generator(model).eval().requires_grad_(False),
        net=BatchedLatentNet(model),
        initial_phi=initial_phi(model),
        group=None,
    ).to(device)
    size = model.image_size
    op = SuperRes(4).to(device)
    clean = torch.rand(batch, model.image_channels, size, size, device=device)
    observed = op(clean)
    name, lr = fit_settings(op.name)
    state = FitState(restoration, batch, name, lr)
    for _ in range(3):  # warm-up (cuDNN plans, allocator)
        state.step(observed, op)
    state = FitState(restoration, batch, name, lr)
    syncs: list = []
    clock.sync()
    start = time.perf_counter()
    timed = 0
    while timed < iterations:
        with counting_syncs(device, syncs):
            state.step(observed, op)
        timed += 1
        if timed % 50 == 0 and time.monotonic() > deadline:
            break  # the rest of the fit would take as long per iteration
    clock.sync()
    seconds = (time.perf_counter() - start) * iterations / timed
    dip_start = time.perf_counter()
    dip_restore(
        observed[:1].cpu(), op.subset(slice(0, 1)), size, iterations=dip_iterations, device=device
    )
    dip_seconds = time.perf_counter() - dip_start
    return {
        "task": "superres x4",
        "batch": batch,
        "iterations": iterations,
        "timed_iterations": timed,
        "seconds": round(seconds, 3),
        "images_per_s": round(batch / seconds, 2),
        "host_syncs_per_iteration": _syncs_per(syncs, 1),
        "dip_iterations": dip_iterations,
        "dip_seconds_per_image": round(dip_seconds, 3),
    }


def _sig(x: float) -> float:
    """Four significant digits."""
    return float(f"{x:.4g}")


def _section(result: dict, name: str, fn) -> None:
    """Run one part; its error is reported in its place rather than ending the others, and
    each part's numbers go to stderr as soon as it ends (a run cut short keeps them)."""
    import sys
    import traceback

    start = time.monotonic()
    try:
        result[name] = fn()
    except Exception as err:
        traceback.print_exc()
        result[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    print(
        f"bench gpu: {name} ({time.monotonic() - start:.1f} s): {json.dumps(result[name])}",
        file=sys.stderr,
        flush=True,
    )


def bench_gpu(quick: bool = False, peak: float | None = None, budget_seconds: float = 170):
    """The measurements described in the module docstring, as one dict. ``budget_seconds``
    bounds the optional parts: torch.compile runs only with more than 45% of it left, and
    the restoration fit stops timing at its share of it."""
    from lcm_dist.config import model_from_dict
    from lcm_dist.planning.cost import model_cost

    started = time.monotonic()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    clock = Clock(device)
    big = _big_config()
    planner_batch = big["data"]["batch_size"]
    if quick:
        preset, batches, inner, warmup, repeats = "demo32", (2, 4), 2, 1, 3
        trainer_batch, rounds, fit_batch, fit_iterations, dip_iterations = 4, 2, 4, 5, 5
        compile_deadline = started  # compiling takes a minute on a CPU: not in --quick
    else:
        preset, batches, inner, warmup, repeats = "paper", (10, planner_batch), 50, 5, 20
        trainer_batch, rounds, fit_batch = planner_batch, 4, 256
        fit_iterations, dip_iterations = 500, 500
        compile_deadline = started + 0.55 * budget_seconds
    model = model_from_dict({"preset": preset})
    cost = model_cost(_trainer_cfg_for_cost(model.preset))
    flops = cost.forward_flops + cost.backward_flops
    peak_value, peak_source = peak_tflops(device, peak)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": quick,
        "preset": preset,
        "image_size": model.image_size,
        "planner_batch": planner_batch,
        "peak_tflops": peak_value,
        "peak_source": peak_source,
        "tf32_convolutions": device.type == "cuda" and torch.backends.cudnn.allow_tf32,
        "flops_per_image_inner_step": flops,
    }
    top = batches[-1]
    _section(
        result,
        "steps",
        lambda: bench_steps(model, batches, device, clock, flops, peak_value, warmup, repeats),
    )
    _section(
        result,
        "layout",
        lambda: bench_layout(model, top, device, clock, warmup, repeats, compile_deadline),
    )
    _section(
        result,
        "trainer",
        lambda: bench_trainer(model, trainer_batch, inner, device, clock, rounds),
    )
    fit_deadline = time.monotonic() + 0.2 * budget_seconds
    _section(
        result,
        "restoration",
        lambda: bench_restoration(
            model, fit_batch, fit_iterations, dip_iterations, device, clock, fit_deadline
        ),
    )
    bf16 = result["steps"].get(f"bf16_b{top}", {})
    trainer = result["trainer"]
    result["summary"] = {
        "mfu_bf16_planner_batch": bf16.get("mfu"),
        "tflops_bf16_planner_batch": bf16.get("tflops"),
        "trainer_vs_bare": trainer.get("trainer_vs_bare"),
        "paging_vs_on_device": trainer.get("paging_vs_on_device"),
        "host_syncs_per_inner_step_trainer": trainer.get("host_syncs_per_inner_step"),
        "host_syncs_per_iteration_restoration": result["restoration"].get(
            "host_syncs_per_iteration"
        ),
    }
    result["goals"] = GOALS
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _trainer_cfg_for_cost(preset: str):
    """A run config of ``preset`` for ``model_cost`` (which reads only its model)."""
    from lcm_dist.config import config_from_dict

    return config_from_dict(
        {
            "run_dir": "unused",
            "model": {"preset": preset},
            "data": {"shards": "unused"},
            "train": {"max_steps": 1},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 1.0}}},
        },
        "benchmark config",
    )
