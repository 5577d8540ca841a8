"""What several test modules share: run configs, the launch scripts run in a subprocess or in
this process, and the state of a finished run."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STEPS = 40  # resume_config's run: 64 images in batches of 4, 16 steps per epoch: 2.5 epochs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(tmp_path: Path, shards: Path, **sections) -> Path:
    """Write a small CPU run config; keyword arguments update whole sections' keys."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "demo32"},
        "data": {"shards": str(shards), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
        "train": {"max_steps": 3, "inner_steps": 2},
        "log": {"every_steps": 1, "image_every_steps": 2, "progress": False},
        "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def resume_config(tmp_path, shards, name, **sections):
    """A deterministic run of STEPS steps in ``tmp_path/name`` that checkpoints every 6."""
    base = dict(
        train={"max_steps": STEPS, "inner_steps": 2, "deterministic": True},
        store={"rows_per_chunk": 4, "url": str(tmp_path / name / "latents.zarr")},
        checkpoint={"every_steps": 6, "keep_latest": 2},
        log={"every_steps": 4, "image_every_steps": 0, "progress": False},
    )
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    folder = tmp_path / name
    folder.mkdir()
    return run_config(folder, shards, **base)


# Launch scripts in a subprocess: what a user runs, for the tests of signals, launchers,
# several processes and kills.


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DS_ACCELERATOR"] = "cpu"
    return env


def run_script(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path = REPO):
    """Run ``python <args>`` from ``cwd`` (the repository root), capturing its output."""
    return subprocess.run(
        [PYTHON, *args],
        cwd=cwd,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch(cfg_path, launcher=None, env=None, **kw):
    """launch/train.py in the background, in its own process group, output on one pipe."""
    cmd = list(launcher or [PYTHON]) + ["launch/train.py", "--config", str(cfg_path)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**subprocess_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a kill takes the whole process group, like a lost node
        **kw,
    )


def run(cfg_path, launcher=None, env=None, timeout=600):
    """launch/train.py run to the end: (exit status, output)."""
    proc = launch(cfg_path, launcher, env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def train_more(cfg_path, *sets, launcher=None, env=None):
    """launch/train.py on ``cfg_path`` with ``--set`` overrides, run to the end."""
    args = [x for kv in sets for x in ("--set", kv)]
    return subprocess.run(
        list(launcher or [PYTHON]) + ["launch/train.py", "--config", str(cfg_path), *args],
        cwd=REPO,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def torchrun(n: int, port: int | None = None) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(n)] + [
        "--master_port",
        str(port or free_port()),
    ]


# Launch scripts in this process: their main(argv), for what does not need a process of its
# own (argument and config errors, single-process runs, exports, restorations). No DeepSpeed
# start-up per call, and the same exit status and output lines as from the command line.


@dataclass
class Completed:
    """What ``subprocess.run`` would report, of a launch script's ``main`` run in-process."""

    returncode: int
    stdout: str
    stderr: str


def load_script(name: str):
    """``launch/<name>.py`` as a module (imported once)."""
    module_name = f"_launch_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "launch" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
_LAUNCHER_VARIABLES += ("MASTER_PORT",)
_GROUP_ENV: dict[str, str] = {}


@contextlib.contextmanager
def process_state(env: dict | None = None, cwd: Path = REPO):
    """Run a training (or anything that builds a ``Trainer``) in this process, from ``cwd``
    (the repository root), with ``env`` added to the environment. What a run changes in the
    process (environment, thread count, deterministic algorithms, fault counters, working
    directory) is put back afterwards, so runs do not see each other and later subprocesses
    inherit nothing from them. The one-process gloo group the first run creates stays for the
    next ones (DeepSpeed keeps a handle on it), and with it the launcher variables DeepSpeed
    reads, set again for each run."""
    import torch.distributed as dist

    from lcm_dist import faults

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.update({"DS_ACCELERATOR": "cpu", **_GROUP_ENV, **(env or {})})
    faults._hits.clear()
    os.chdir(cwd)
    try:
        yield
    finally:
        if dist.is_initialized() and not _GROUP_ENV:
            _GROUP_ENV.update({k: os.environ[k] for k in _LAUNCHER_VARIABLES if k in os.environ})
        faults._hits.clear()
        gc.collect()  # a failed run's lock file and store handles close now, not later
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def call_main(name: str, argv: list, env: dict | None = None, cwd: Path = REPO) -> int:
    """``launch/<name>.py``'s ``main(argv)`` in this process (see ``process_state``); its exit
    status."""
    with process_state(env, cwd):
        try:
            return load_script(name).main([str(a) for a in argv])
        except SystemExit as exit:  # argparse's usage errors
            return exit.code if isinstance(exit.code, int) else 2


# A finished run's state.


def read_scalars(run_dir):
    """The TensorBoard event data of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return acc


def final_state(cfg_path, steps: int = STEPS, storage_options=None):
    """Generator weights and all latent rows of the run's newest commit (which is at step
    ``steps``)."""
    from safetensors.torch import load_file

    from lcm_dist.latents.store import LatentStore
    from lcm_dist.train.checkpoint import find_latest

    cfg = json.loads(Path(cfg_path).read_text())
    commit = find_latest(cfg["run_dir"])
    assert commit.state["step"] == steps
    store = LatentStore.open(cfg["store"]["url"], storage_options=storage_options)
    store.restore_slots(commit.slots)
    rows = torch.from_numpy(store.read_rows(range(store.num_rows)))
    return load_file(str(commit.folder / "generator.safetensors")), rows


def assert_same_state(a, b):
    gen_a, rows_a = a
    gen_b, rows_b = b
    assert gen_a.keys() == gen_b.keys()
    for name in gen_a:
        assert torch.equal(gen_a[name], gen_b[name]), f"generator weight {name} differs"
    assert torch.equal(rows_a, rows_b), "latent rows differ"


def save_images(images, folder):
    """Write a batch of (C, H, W) images in [0, 1] as ``folder/img<i>.png``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr.squeeze()).save(folder / f"img{i}.png")
