"""The CUDA path: one-GPU NCCL training (ZeRO 0 and 2, fp32 and bf16), a process that sees only
its own GPU, inner steps that never wait for the GPU, resume after a kill, export, restoration
and the DIP baseline on the GPU. Collected everywhere, run wherever CUDA is
present (``python -m pytest -m gpu``), skipped elsewhere with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import final_state, free_port, resume_config, run, run_config, run_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"
    ),
]


def gpu_env() -> dict[str, str]:
    # The suite's subprocesses default to the CPU accelerator; these ask for CUDA.
    return {"DS_ACCELERATOR": "cuda"}


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_gpu_nccl_training(tmp_path, demo_shards, stage, precision):
    deepspeed = {"zero_optimization": {"stage": stage}}
    if precision == "bf16":
        deepspeed["bf16"] = {"enabled": True}
    cfg = run_config(
        tmp_path,
        demo_shards,
        train={"max_steps": 8, "inner_steps": 2},
        checkpoint={"every_steps": 4},
        deepspeed=deepspeed,
    )
    proc = run_script("launch/train.py", "--config", str(cfg), env=gpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    from lcm_dist.train.checkpoint import find_latest

    commit = find_latest(tmp_path / "run")
    assert commit.state["step"] == 8
    weights = load_file(str(commit.folder / "generator.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_batches_reach_the_gpu_as_pinned_uint8_and_equal_the_host_conversion(demo_shards):
    from lcm_dist.data.loader import ShardLoader, images_on

    loader = ShardLoader(demo_shards, batch_size=8, num_workers=2, pin_memory=True)
    batch = next(iter(loader))
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.is_pinned()
    on_gpu = images_on(batch.pixels, torch.device("cuda"))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert torch.equal(on_gpu.cpu(), batch.images)


def test_gpu_run_killed_mid_checkpoint_resumes(tmp_path, demo_shards):
    """Killed inside its second checkpoint, the run resumes from the first. (Not compared
    bitwise with an uninterrupted run: bilinear upsampling's CUDA backward uses atomics.)"""
    crashed = resume_config(tmp_path, demo_shards, "crashed")
    env = {**gpu_env(), "LCM_DIST_CRASH_AT": "checkpoint.before_commit:2"}
    code, out = run(crashed, env=env)
    assert code != 0
    code, out = run(crashed, env=gpu_env())
    assert code == 0, out[-3000:]
    assert "resuming from step-00000006 (1 -> 1 processes)" in out
    generator, rows = final_state(crashed)
    assert torch.isfinite(rows).all()
    assert all(torch.isfinite(w).all() for w in generator.values() if w.is_floating_point())


def test_export_restore_and_dip_on_the_gpu(tmp_path, demo_shards):
    from lcm_dist.data.demo import random_crops

    cfg = run_config(tmp_path, demo_shards, train={"max_steps": 16, "inner_steps": 2})
    proc = run_script("launch/train.py", "--config", str(cfg), env=gpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "model.zarr"
    proc = run_script("launch/export.py", "--run", str(tmp_path / "run"), "--out", str(export))
    assert proc.returncode == 0, proc.stderr[-3000:]
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    for i, (_, image) in enumerate(random_crops(2, 32, seed=9)):
        image.save(held_out / f"{i}.png")
    out = tmp_path / "restored"
    proc = run_script(
        "launch/restore.py",
        "--model",
        str(export),
        "--task",
        "inpaint",
        "--device",
        "cuda",
        "--iterations",
        "20",
        "--out",
        str(out),
        str(held_out),
        env=gpu_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("*.png"))) == 2
    report = tmp_path / "eval"
    proc = run_script(
        "launch/evaluate.py",
        "--model",
        str(export),
        "--task",
        "superres",
        "--device",
        "cuda",
        "--iterations",
        "20",
        "--baselines",
        "dip,naive",
        "--images",
        str(held_out),
        "--out",
        str(report),
        env=gpu_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((report / "report.json").read_text())
    assert {"lcm", "dip"} <= set(results["methods"])


def test_a_process_that_sees_only_its_own_gpu_binds_cuda_0(tmp_path, demo_shards):
    """Rank 3 of a node's four, shown one GPU (SLURM --gpus-per-task=1): DeepSpeed alone would
    bind cuda:3, which does not exist in this process."""
    cfg = run_config(tmp_path, demo_shards, train={"max_steps": 2, "inner_steps": 2})
    launcher = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "CUDA_VISIBLE_DEVICES": "0",
    }
    proc = run_script("launch/train.py", "--config", str(cfg), env={**gpu_env(), **launcher})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 2" in proc.stdout + proc.stderr


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_training_and_restoration_inner_steps_never_wait_for_the_gpu(precision):
    """Inner steps of training (the latent nets, the generator, the loss, SGD on both) and of
    restoration run under ``set_sync_debug_mode("error")``: any host sync raises. DeepSpeed's
    own step is measured by ``bench.py gpu`` (trainer.host_syncs_per_inner_step)."""
    from lcm_dist.config import ModelConfig
    from lcm_dist.model.generator import Generator, set_memory_format
    from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi
    from lcm_dist.restore.degrade import make_operator
    from lcm_dist.restore.fit import FitState, fit_settings
    from lcm_dist.restore.model import RestorationModel
    from lcm_dist.train.step import fit_batch
    from tests.model.test_host_copies import PlainEngine, _cfg

    cuda = torch.device("cuda")
    cfg = _cfg()
    net = BatchedLatentNet(cfg.model).to(cuda)
    generator = Generator(cfg.model).to(cuda).to(precision)
    set_memory_format(generator, "auto", cuda)
    engine = PlainEngine(generator)
    phi = initial_phi(cfg.model).to(cuda).repeat(2, 1).requires_grad_(True)
    images = torch.rand(2, 3, 64, 64, device=cuda)
    fit_batch(engine, net, phi, images, cfg, net.mask, precision)  # first use sets things up
    model = RestorationModel(
        url="(test)",
        attrs={},
        model=ModelConfig(preset="demo64"),
        generator=Generator(cfg.model).eval().requires_grad_(False),
        net=BatchedLatentNet(cfg.model),
        initial_phi=initial_phi(cfg.model),
        group=None,
    ).to(cuda)
    states = []
    for task in ("inpaint", "superres", "colorize"):
        op = make_operator(task, 64, 2).to(cuda)
        observed = op(images)
        state = FitState(model, 2, *fit_settings(task))
        state.step(observed, op)
        states.append((state, observed, op))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fit_batch(engine, net, phi, images, cfg, net.mask, precision)
        for state, observed, op in states:
            state.step(observed, op)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(phi).all()
