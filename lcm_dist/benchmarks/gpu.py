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

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lcm_dist.benchmarks.gpu_tools import (
    BareStep,
    Clock,
    counting_syncs,
    layer_forward_ms,
    measure_steps,
    peak_tflops,
    syncs_per,
)

REPO = Path(__file__).resolve().parents[2]

GOALS = {
    "mfu_bf16_planner_batch": ">= 0.35",
    "trainer_vs_bare": "<= 1.05",
    "paging_vs_on_device": "<= 1.02",
}


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
        "host_syncs_per_inner_step": syncs_per(syncs, inner),
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
        "host_syncs_per_iteration": syncs_per(syncs, 1),
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
