"""The registry of a run's stateful parts (``lcm_dist.train.resume``): the commit collects each
part's state, a resume checks and loads them in order, and a new part is one registration."""

from __future__ import annotations

import pytest
import torch

from lcm_dist.commits import CheckpointError, Commit, find_latest
from lcm_dist.config import load_config
from lcm_dist.train import resume
from tests.helpers import run_config


def _state(tmp_path, demo_shards, num_images=64):
    cfg = load_config(run_config(tmp_path, demo_shards))
    run_state = resume.RunState(cfg, num_images)
    run_state.register("position", resume.PositionPart(cfg))
    return cfg, run_state


def test_the_commit_collects_every_registered_part(tmp_path, demo_shards):
    _, run_state = _state(tmp_path, demo_shards)
    state = run_state.state(resume.At(step=7, epoch=1, batch_in_epoch=3))
    assert state["step"] == 7 and state["epoch"] == 1 and state["batch_in_epoch"] == 3
    assert state["num_images"] == 64 and state["model"]["preset"] == "demo32"
    assert set(resume.PLAN_KEYS) <= set(state) and "store_url" in state

    class Counter(resume.Part):
        def __init__(self):
            self.loaded = None

        def state(self, at):
            return {"counter": at.step * 10}

        def load(self, saved, commit):
            self.loaded = saved["counter"]
            return "counter restored"

    counter = run_state.register("counter", Counter())
    state = run_state.state(resume.At(7, 1, 3))
    assert state["counter"] == 70
    torch.save({"torch": torch.get_rng_state()}, tmp_path / "rng-rank0.pt")
    commit = Commit("step-00000007", tmp_path, {**state, "format": "x"}, None)
    note = run_state.load(commit)
    assert counter.loaded == 70
    assert note == "; resuming from step-00000007 (1 -> 1 processes, counter restored)"
    assert run_state.parts["position"].start == (8, 1, 3)


def test_a_part_may_not_record_a_key_twice_or_register_twice(tmp_path, demo_shards):
    _, run_state = _state(tmp_path, demo_shards)

    class Again(resume.Part):
        def state(self, at):
            return {"step": 0}

    run_state.register("again", Again())
    with pytest.raises(ValueError, match="'again' records 'step' a second time"):
        run_state.state(resume.At(1, 0, 0))
    with pytest.raises(ValueError, match="registered already"):
        run_state.register("again", Again())


def test_a_resume_is_refused_by_the_part_that_cannot_continue(tmp_path, demo_shards):
    _, run_state = _state(tmp_path, demo_shards)
    saved = run_state.state(resume.At(3, 0, 1))
    ok = Commit("step-00000003", tmp_path, saved, None)
    run_state.check(ok)
    other_model = {**saved, "model": {**saved["model"], "noise_size": 99}}
    with pytest.raises(CheckpointError, match="noise_size: checkpoint 99 vs config 16"):
        run_state.check(Commit("t", tmp_path, other_model, None))
    with pytest.raises(CheckpointError, match="checkpointed on 65"):
        run_state.check(Commit("t", tmp_path, {**saved, "num_images": 65}, None))
    with pytest.raises(CheckpointError, match="keeps its latents in s3://elsewhere"):
        run_state.check(Commit("t", tmp_path, {**saved, "store_url": "s3://elsewhere"}, None))


def test_a_trained_run_commits_exactly_what_its_parts_record(trained_run):
    cfg = load_config(trained_run / "config.json")
    saved = find_latest(trained_run).state
    run_state = resume.RunState(cfg, saved["num_images"])
    run_state.register("engine", resume.EnginePart(None))
    run_state.register("position", resume.PositionPart(cfg))
    expected = run_state.state(resume.At(saved["step"], saved["epoch"], saved["batch_in_epoch"]))
    assert {k: v for k, v in saved.items() if k not in ("format", "version")} == expected
