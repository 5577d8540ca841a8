"""Mixed precision: bf16 keeps fp32 weights and BatchNorm statistics in checkpoints and
resumes on another world size; fp16 is refused. (ZeRO-3 is refused by the config:
tests/test_config.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from lcm_dist.config import load_config
from lcm_dist.train.checkpoint import find_latest
from tests.helpers import run, run_config, torchrun, train_more


def test_fp16_is_refused_before_anything_is_written(tmp_path, demo_shards, cli):
    cfg = run_config(tmp_path, demo_shards, deepspeed={"fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="'deepspeed.fp16.enabled' is true, but fp16 is not"):
        load_config(str(cfg))
    proc = cli("train", "--config", cfg)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "use deepspeed.bf16" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _config(tmp_path, shards, **deepspeed):
    return run_config(
        tmp_path,
        shards,
        train={"max_steps": 6, "inner_steps": 2},
        checkpoint={"every_steps": 3},
        log={"every_steps": 3, "image_every_steps": 0},
        deepspeed={"optimizer": {"type": "SGD", "params": {"lr": 0.1}}, **deepspeed},
    )


@pytest.mark.dist
@pytest.mark.slow
def test_bf16_checkpoints_hold_fp32_weights_and_resume_on_another_world_size(tmp_path, demo_shards):
    cfg = _config(tmp_path, demo_shards, bf16={"enabled": True}, zero_optimization={"stage": 2})
    code, out = run(cfg, torchrun(2))
    assert code == 0, out[-3000:]
    from safetensors.torch import load_file

    commit = find_latest(tmp_path / "run")
    weights = load_file(str(commit.folder / "generator.safetensors"))
    floats = [w for w in weights.values() if w.is_floating_point()]
    assert floats and all(w.dtype == torch.float32 for w in floats)
    # The optimizer's fp32 masters, not an upcast of the bf16 copy: most values carry bits
    # that bf16 has no room for.
    finer = sum(int((w != w.bfloat16().float()).sum()) for w in floats)
    assert finer > sum(w.numel() for w in floats) // 2
    # BatchNorm's running statistics were kept and updated in fp32 on each process.
    own = torch.load(commit.folder / "rng-rank1.pt", weights_only=True)["buffers"]
    stats = {k: v for k, v in own.items() if "running_" in k}
    assert stats and all(v.dtype == torch.float32 for v in stats.values())
    assert sum(int((v != v.bfloat16().float()).sum()) for v in stats.values()) > 0
    # One process now: ZeRO-2's optimizer state stays behind, and the fp32 weights come back
    # from the checkpoint exactly (the resume checks them against generator.safetensors).
    proc = train_more(cfg, "train.max_steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "resuming from step-00000006 (2 -> 1 processes, optimizer state reset" in out
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 8
