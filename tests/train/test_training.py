"""Training end to end: in one process (the suite's trained run, and launch/train.py's main
run in-process), and as two gloo processes under torchrun and the deepspeed launcher."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.helpers import PYTHON, REPO, free_port, read_scalars, run_config, subprocess_env


def test_single_process_training_lowers_the_loss(trained_run):
    # The suite's trained run: 16 steps, the loss logged every 4.
    run = trained_run
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["train"]["max_steps"] == 16
    acc = read_scalars(run)
    losses = [e.value for e in acc.Scalars("loss/total")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert {"loss/lap_l1", "loss/mse", "perf/images_per_second", "lr/phi", "lr/theta"} <= set(
        acc.Tags()["scalars"]
    )
    assert "reconstruction" in acc.Tags()["images"]
    # Where the time went, per log window.
    phases = ["data_wait", "store_wait", "forward_backward", "optimizer", "write_back"]
    tags = set(acc.Tags()["scalars"])
    assert {f"time/{p}_s" for p in phases} | {"time/checkpoint_s"} <= tags
    assert {"perf/images_per_second_slowest_process", "perf/tflops_per_process"} <= tags
    compute = sum(acc.Scalars(f"time/{p}_s")[-1].value for p in ("forward_backward", "optimizer"))
    step = [e.wall_time for e in acc.Scalars("loss/total")]
    assert 0 < compute < (step[-1] - step[-2])  # 4 steps of compute fit within 4 steps of time
    assert acc.Scalars("perf/tflops_per_process")[-1].value > 0


def test_latents_are_paged_through_the_store_and_refused_for_another_model(
    tmp_path, demo_shards, cli
):
    from lcm_dist.latents.store import LatentStore

    url = str(tmp_path / "latents.zarr")
    # 16 steps of 4 images = one epoch of the 64 images: every row trained once.
    cfg_path = run_config(
        tmp_path,
        demo_shards,
        train={"max_steps": 16, "inner_steps": 1},
        store={"url": url, "cache_bytes": 3 * 8 * 24448 * 4, "rows_per_chunk": 8},
        log={"every_steps": 16},
    )
    proc = cli("train", "--config", cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = LatentStore.open(url)
    assert store.rows_per_chunk == 8 and (store.committed >= 0).all()
    trained = store.read_rows(range(64))
    assert not (trained == store.initial).all(axis=1).any(), "some row was never updated"
    acc = read_scalars(tmp_path / "run")
    written = acc.Scalars("store/bytes_written")[-1].value
    assert written == 64 * 24448 * 4
    assert acc.Scalars("store/peak_resident_bytes")[-1].value <= 3 * 8 * 24448 * 4
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "latents.zarr").rglob("*")}

    # A new run (fresh run_dir) pointed at this store with another model is refused by the
    # store itself; nothing in it is touched.
    proc = cli(
        "train",
        *("--config", cfg_path, "--set", "model.phi_init_seed=5"),
        *("--set", f"run_dir={tmp_path / 'run2'}"),
    )
    assert proc.returncode == 2
    assert f"latent store {url} was made for another model (phi_init_seed: store 42" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "latents.zarr").rglob("*")} == before


def test_store_smaller_than_dataset_is_refused(tmp_path, demo_shards, cli):
    from lcm_dist.config import config_from_dict
    from lcm_dist.latents.store import LatentStore, model_signature

    url = str(tmp_path / "small.zarr")
    model = config_from_dict(json.loads(run_config(tmp_path, demo_shards).read_text())).model
    from lcm_dist.model.latent_net import initial_phi

    LatentStore.create(
        url,
        num_rows=10,
        initial=initial_phi(model).numpy(),
        signature=model_signature(model),
        rows_per_chunk=8,
    )
    proc = cli("train", "--config", run_config(tmp_path, demo_shards, store={"url": url}))
    assert proc.returncode == 2
    assert "holds 10 rows but the dataset has 64 images" in proc.stderr


def test_bad_config_key_exits_with_one_line(tmp_path, demo_shards, cli):
    cfg_path = run_config(tmp_path, demo_shards, train={"lr_phy": 1.0})
    proc = cli("train", "--config", cfg_path)
    assert proc.returncode == 2
    assert "unknown config key 'train.lr_phy'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_one_line(tmp_path, demo_shards, cli):
    # phi's normalization scale and shift are not clamped: a huge lr_phi overflows them.
    cfg_path = run_config(tmp_path, demo_shards, train={"lr_phi": 1e38})
    proc = cli("train", "--config", cfg_path)
    assert proc.returncode == 2
    assert "error: the loss became nan at step" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failed_run_stops_its_loader_workers_at_once(tmp_path, demo_shards):
    """The workers ignore SIGTERM, and an error's traceback keeps the run's frames (and its
    loader) alive: unless the run ends its batch stream itself, they outlive the failure and
    the interpreter waits for them at exit."""
    import multiprocessing

    from lcm_dist.config import load_config
    from lcm_dist.train.loop import NonFiniteLossError, train
    from tests.helpers import process_state

    path = run_config(tmp_path, demo_shards, train={"lr_phi": 1e38}, data={"num_workers": 2})
    with process_state():
        with pytest.raises(NonFiniteLossError) as failure:
            train(load_config(path))
        assert failure.traceback  # the frames that hold the trainer are still referenced
        assert multiprocessing.active_children() == []


LAUNCHERS = {
    "torchrun": [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "deepspeed": [PYTHON, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2"],
}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_gloo_training(tmp_path, demo_shards, launcher):
    cfg_path = run_config(tmp_path, demo_shards, deepspeed={"zero_optimization": {"stage": 2}})
    cmd = LAUNCHERS[launcher] + ["--master_port", str(free_port())]
    cmd += ["launch/train.py", "--config", str(cfg_path)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    acc = read_scalars(tmp_path / "run")
    losses = [e.value for e in acc.Scalars("loss/total")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_restoration_preview_shows_in_tensorboard_and_leaves_training_alone(
    tmp_path, demo_shards, cli
):
    from safetensors.torch import load_file

    from lcm_dist.data.demo import random_crops
    from lcm_dist.train.checkpoint import find_latest

    held = tmp_path / "held"
    held.mkdir()
    for i, (_, image) in enumerate(random_crops(3, 32, seed=99)):
        image.save(held / f"h{i}.png")
    weights = {}
    for name, log in [
        ("plain", {}),
        (
            "preview",
            {"restore_every_steps": 2, "restore_images": str(held), "restore_iterations": 3},
        ),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        cfg_path = run_config(
            folder, demo_shards, train={"max_steps": 4, "deterministic": True}, log=log
        )
        proc = cli("train", "--config", cfg_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        commit = find_latest(folder / "run")
        weights[name] = load_file(str(commit.folder / "generator.safetensors"))
    acc = read_scalars(tmp_path / "preview" / "run")
    assert "restoration/inpainting" in acc.Tags()["images"]
    assert len(acc.Scalars("restoration/inpainting_psnr_hole")) == 2
    for key, value in weights["plain"].items():
        assert torch.equal(value, weights["preview"][key]), f"the preview changed {key}"


def test_demo_trains_then_says_it_has_finished(tmp_path, cli):
    args = [
        "--images",
        "16",
        "--set",
        f"run_dir={tmp_path / 'run'}",
        "--set",
        f"data.shards={tmp_path / 'shards'}",
        "--set",
        "train.max_steps=2",
        "--set",
        "log.progress=false",
    ]
    first = cli("demo", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "demo: making 16 crops" in first.stdout
    assert "demo: loss " in first.stdout and "over 2 batches" in first.stdout
    again = cli("demo", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "demo: using the 16 crops" in again.stdout
    assert f"demo: the run in {tmp_path / 'run'} is already finished" in again.stdout
    assert "nan" not in again.stdout


@pytest.mark.dist
@pytest.mark.slow
def test_an_error_on_one_process_is_one_line_on_the_others(tmp_path):
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(random_crops(64, 32, seed=1), shards, 32, 8, progress=False)
    broken = shards / "shard-000002.tar"
    broken.write_bytes(broken.read_bytes()[:1600])  # truncated inside an image
    cfg_path = run_config(tmp_path, shards, train={"max_steps": 40})
    cmd = LAUNCHERS["torchrun"] + ["--master_port", str(free_port())]
    cmd += ["launch/train.py", "--config", str(cfg_path)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: cannot read shard" in out and "shard-000002.tar" in out
    # The other process either notices the lost connection first and says so in one line, or
    # is stopped by torchrun before it does; it never prints a traceback of its own.
    assert "Connection closed by peer" not in out
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
