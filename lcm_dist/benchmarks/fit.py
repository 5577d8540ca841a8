"""Fitting many images (``launch/fit.py``) on one CPU process and on two, one thread each.

Trains a small ``demo64`` model for a few batches and exports it, writes ``images`` random
64x64 crops of scikit-image's photos as shards, then embeds them (``--task embed``, a few
iterations each) with ``python launch/fit.py`` and with ``torchrun --nproc_per_node 2
launch/fit.py``. Images per second count the fitting itself (each process's own timer, the
slowest process for two), not the start-up of Python, torch and the launcher. ``speedup`` is
two processes' images/s over one's; ``max_abs_diff`` the largest difference between the two
fits' phi (0.0: the same bits, as the units do not depend on the number of processes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lcm_dist.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stderr


def make_export(tmp: Path, steps: int = 4) -> Path:
    """A ``demo64`` model trained for ``steps`` batches on 64 crops, exported."""
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards
    from lcm_dist.export import export_run

    shards = tmp / "train-shards"
    write_shards(random_crops(64, 64, seed=1), shards, 64, 32, progress=False)
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"preset": "demo64"},
        "data": {"shards": str(shards), "batch_size": 16, "num_workers": 0},
        "train": {"max_steps": steps, "inner_steps": 2},
        "log": {"every_steps": 1, "image_every_steps": 0, "progress": False},
        "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    _run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(path)], "training")
    out = tmp / "model.zarr"
    export_run(tmp / "run", str(out), progress=False)
    return out


def _fit_seconds(stderr: str) -> float:
    """The slowest process's fitting time, from its ``process R: fitted N image(s) in Xs``."""
    times = [float(t) for t in re.findall(r"fitted \d+ image\(s\) in ([0-9.]+)s", stderr)]
    if not times:
        raise RuntimeError(f"launch/fit.py reported no time: {stderr[-1000:]}")
    return max(times)


def bench_fit(images: int = 1024, iterations: int = 3, batch_size: int = 64) -> dict:
    import zarr

    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    with tempfile.TemporaryDirectory(prefix="lcm-bench-fit-") as name:
        tmp = Path(name)
        print("training and exporting a small model ...", file=sys.stderr, flush=True)
        export = make_export(tmp)
        shards = tmp / "shards"
        write_shards(random_crops(images, 64, seed=5), shards, 64, 128, progress=False)
        fit = [str(REPO / "launch" / "fit.py"), "--model", str(export), "--task", "embed"]
        fit += [str(shards), "--iterations", str(iterations), "--batch-size", str(batch_size)]
        fit += ["--quiet", "--device", "cpu"]
        result: dict = {"images": images, "iterations": iterations, "batch_size": batch_size}
        phis = {}
        for procs in (1, 2):
            out = tmp / f"fit-{procs}"
            if procs == 1:
                cmd = [sys.executable, *fit, "--out", str(out)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
                cmd += ["--master_port", str(free_port()), *fit, "--out", str(out)]
            print(f"fitting {images} images on {procs} process(es) ...", file=sys.stderr)
            seconds = _fit_seconds(_run(cmd, f"the fit on {procs} process(es)"))
            result[f"images_per_s_{procs}"] = round(images / seconds, 2)
            result[f"seconds_{procs}"] = round(seconds, 2)
            phis[procs] = np.asarray(
                zarr.open_group(str(out / "latents.zarr"), mode="r")["latents"][:]
            )
        result["speedup"] = round(result["images_per_s_2"] / result["images_per_s_1"], 3)
        result["max_abs_diff"] = float(np.abs(phis[1] - phis[2]).max())
        return result
