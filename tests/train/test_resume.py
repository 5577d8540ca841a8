"""Checkpoints: exact resume after SIGKILL at any instant, elastic world size, bad checkpoints."""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from lcm_dist.train.checkpoint import find_latest
from tests.helpers import (
    PYTHON,
    STEPS,
    assert_same_state,
    final_state,
    free_port,
    launch,
    read_scalars,
    resume_config,
    run,
    train_more,
)


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_uninterrupted(tmp_path, demo_shards):
    reference = resume_config(tmp_path, demo_shards, "reference")
    code, out = run(reference)
    assert code == 0, out[-3000:]

    crashed = resume_config(tmp_path, demo_shards, "crashed")
    # Kills at chosen instants: mid-checkpoint (engine files written, nothing committed), right
    # before and right after the commit rename, and inside chunk flushes. These come first:
    # how far they get is the same on any machine, so they never find the run finished...
    for point in [
        "checkpoint.write:1",
        "store.write_chunk:9",
        "checkpoint.before_commit:1",
        "checkpoint.after_commit:1",
        "store.write_chunk:3",
    ]:
        code, out = run(crashed, env={"LCM_DIST_CRASH_AT": point})
        assert code == -signal.SIGKILL, f"{point} did not crash the run:\n{out[-2000:]}"
    # ...then at random instants once training runs (the whole process group, like a lost
    # node), soon enough that the run has steps left on a fast machine.
    rng = random.Random(0)
    for _ in range(2):
        proc = launch(crashed)
        for line in proc.stdout:
            if line.startswith("lcm-dist:"):
                break
        time.sleep(rng.uniform(0.05, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    code, out = run(crashed)
    assert code == 0, out[-3000:]
    assert "resuming from step-" in out
    done = re.search(r"done: step 40 \((\d+) batches", out)
    assert done and int(done.group(1)) < STEPS, out  # it continued, it did not start over
    assert_same_state(final_state(reference), final_state(crashed))


@pytest.mark.dist
@pytest.mark.slow
def test_sigkill_under_the_deepspeed_launcher_resumes_exactly(tmp_path, demo_shards):
    def launcher():
        return [PYTHON, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2"] + [
            "--master_port",
            str(free_port()),
        ]

    zero2 = {"zero_optimization": {"stage": 2}}
    reference = resume_config(tmp_path, demo_shards, "reference", deepspeed=zero2)
    code, out = run(reference, launcher())
    assert code == 0, out[-3000:]
    crashed = resume_config(tmp_path, demo_shards, "crashed", deepspeed=zero2)
    code, out = run(crashed, launcher(), env={"LCM_DIST_CRASH_AT": "checkpoint.before_commit:3"})
    assert code != 0
    code, out = run(crashed, launcher())
    assert code == 0, out[-3000:]
    assert "resuming from step-00000012 (2 -> 2 processes)" in out
    assert_same_state(final_state(reference), final_state(crashed))


def _losses(run_dir):
    return {e.step: e.value for e in read_scalars(run_dir).Scalars("loss/total")}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_elastic_resume_changes_world_size_and_keeps_learning(tmp_path, demo_shards, first, second):
    def launcher(n):
        if n == 1:
            return [PYTHON]
        return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(n)] + [
            "--master_port",
            str(free_port()),
        ]

    cfg = resume_config(
        tmp_path,
        demo_shards,
        "elastic",
        train={"max_steps": 24, "deterministic": False},
        checkpoint={"every_steps": 8},
        log={"every_steps": 8},
        deepspeed={"zero_optimization": {"stage": 2}},
    )
    code, out = run(cfg, launcher(first))
    assert code == 0, out[-3000:]
    before = _losses(tmp_path / "elastic" / "run")
    proc = train_more(cfg, "train.max_steps=48", launcher=launcher(second))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from step-00000024 ({first} -> {second} processes" in out
    after = _losses(tmp_path / "elastic" / "run")
    assert after[48] < before[8], (before, after)
    assert after[48] < after[32] or after[40] < before[24], (before, after)


def train_in_process(cli, cfg_path, *sets, env=None):
    """launch/train.py's main on ``cfg_path`` with ``--set`` overrides, in this process."""
    return cli("train", "--config", cfg_path, *[x for kv in sets for x in ("--set", kv)], env=env)


def test_bad_checkpoints_are_clear_errors_and_never_a_fresh_start(tmp_path, demo_shards, cli):
    cfg = resume_config(tmp_path, demo_shards, "bad", train={"max_steps": 12})
    proc = train_in_process(cli, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "bad" / "run"
    pointer = (run_dir / "latest.json").read_text()

    # A config whose model differs from the checkpoint's.
    proc = train_in_process(cli, cfg, "train.max_steps=18", "model.gen_head_widths=[16,4]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the config's model differs from the one checkpointed" in proc.stderr
    assert "gen_head_widths: checkpoint [16, 8] vs config [16, 4]" in proc.stderr

    def resume_with(*sets, env=None):
        return train_in_process(cli, cfg, "train.max_steps=18", *sets, env=env)

    # Store settings the store was not made with: an error, not silently ignored.
    proc = resume_with("store.dtype=float16", "store.codec=zstd")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "was made with other settings (store.dtype: store 'float32' vs config 'float16', "
        "store.codec: store 'none' vs config 'zstd')"
    ) in proc.stderr

    # Other shards with fewer images than the run was checkpointed on.
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    write_shards(random_crops(32, 32, seed=1), tmp_path / "fewer", 32, 8, progress=False)
    proc = resume_with(f"data.shards={tmp_path / 'fewer'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hold 32 images but the run in" in proc.stderr and "checkpointed on 64" in proc.stderr

    # A preview image source that does not exist fails before a new run writes anything.
    fresh = tmp_path / "fresh-run"
    proc = resume_with(
        f"run_dir={fresh}",
        f"store.url={fresh / 'latents.zarr'}",
        "log.restore_every_steps=5",
        "log.restore_images=nothere",
    )
    assert proc.returncode == 2 and "image source 'nothere' does not exist" in proc.stderr
    assert not fresh.exists()
    assert (run_dir / "latest.json").read_text() == pointer

    # A full disk while writing a checkpoint: clear error, the previous commit still resumes.
    proc = resume_with(env={"LCM_DIST_FAIL_AT": "checkpoint.write:1"})
    assert proc.returncode == 2
    assert "No space left on device" in proc.stderr and "previous commit" in proc.stderr
    assert (run_dir / "latest.json").read_text() == pointer
    assert find_latest(run_dir).state["step"] == 12

    # A truncated checkpoint file: a clear error, nothing trained, the pointer untouched.
    engine_file = run_dir / "checkpoints" / "step-00000012" / "mp_rank_00_model_states.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:1000])
    proc = resume_with()
    assert proc.returncode == 2
    assert "mp_rank_00_model_states.pt is truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "latest.json").read_text() == pointer


def test_resume_under_another_data_plan_says_the_epoch_restarts(tmp_path, demo_shards, cli):
    cfg = resume_config(tmp_path, demo_shards, "workers", train={"max_steps": 6})
    proc = train_in_process(cli, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]  # committed at batch 6 of the 16 of epoch 0
    proc = train_in_process(cli, cfg, "train.max_steps=7", "data.num_workers=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 0 restarted (data.num_workers changed)" in proc.stdout + proc.stderr
    assert find_latest(tmp_path / "workers" / "run").state["batch_in_epoch"] == 1
    # The batch size, seed and shuffle window also decide which images the rest of the epoch
    # holds: changing them restarts it too, and the message names each.
    proc = train_in_process(
        cli,
        cfg,
        "train.max_steps=8",
        "data.num_workers=1",
        "data.batch_size=2",
        "train.seed=5",
        "data.shuffle_buffer=4",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "epoch 0 restarted (data.batch_size, train.seed, data.shuffle_buffer changed)"
        in proc.stdout + proc.stderr
    )
    assert find_latest(tmp_path / "workers" / "run").state["batch_in_epoch"] == 1


@pytest.mark.slow
def test_a_second_launch_of_a_running_run_is_refused(tmp_path, demo_shards):
    cfg = resume_config(tmp_path, demo_shards, "twice", train={"max_steps": 100000})
    first = launch(cfg)
    try:
        lock = tmp_path / "twice" / "run" / ".lock"
        deadline = time.monotonic() + 300
        while not (lock.exists() and "pid" in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "first run did not start"
            time.sleep(0.2)
        code, out = run(cfg)
        assert code == 2, out[-3000:]
        assert f"another training process (pid {first.pid} on " in out
        assert f"is using {tmp_path / 'twice' / 'run'}; wait for it to end or stop it" in out
        assert first.poll() is None  # the first run trains on, undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # Killed, it holds the lock no more: the run can be launched again.
    proc = train_more(cfg, "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    "point, failing, doing",
    [
        ("store.sync", 1, "writing back the latents for the checkpoint of step 6"),
        ("checkpoint.write", 1, "writing checkpoint step-00000006"),
        ("checkpoint.commit", 0, "committing checkpoint step-00000006"),
    ],
)
def test_a_full_disk_on_one_process_stops_the_others_with_one_line(
    tmp_path, demo_shards, point, failing, doing
):
    """Plain processes, no launcher to kill the survivors: one process's checkpoint step fails
    (its write-back, its own files, or the main process's commit), and the other must stop by
    itself, saying which process failed and while doing what."""
    import subprocess

    from tests.helpers import REPO, subprocess_env

    cfg = resume_config(tmp_path, demo_shards, "run", train={"max_steps": 8})
    port = str(free_port())
    procs, logs = [], []
    try:
        for rank in (0, 1):
            env = subprocess_env()
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                LCM_DIST_FAIL_AT=f"{point}@{failing}",
            )
            logs.append(tmp_path / f"rank{rank}.err")
            with open(logs[-1], "w") as err:
                procs.append(
                    subprocess.Popen(
                        [PYTHON, "launch/train.py", "--config", str(cfg)],
                        cwd=REPO,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = [log.read_text() for log in logs]
    assert codes == [2, 2], err
    other = 1 - failing
    assert "no space left on device" in err[failing].lower()
    assert f"process {failing} of the run stopped while {doing}" in err[other]
    assert "Traceback" not in err[0] + err[1]
    assert find_latest(tmp_path / "run" / "run") is None  # nothing was committed


def test_each_checkpoint_file_is_verified_by_one_process():
    from lcm_dist.train.checkpoint import files_of_rank

    names = [
        "generator.safetensors",
        "state.json",
        "slots.npy",
        "mp_rank_00_model_states.pt",
        "rng-rank0.pt",
        "rng-rank1.pt",
        "rng-rank2.pt",
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_2_mp_rank_00_optim_states.pt",
    ]
    for world in (1, 2, 3, 4):
        shares = [files_of_rank(names, r, world) for r in range(world)]
        assert sorted(n for share in shares for n in share) == sorted(names)  # each once
    assert files_of_rank(names, 1, 2) == [
        "rng-rank1.pt",
        "rng-rank2.pt",  # left by a larger world: the last rank checks it
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_2_mp_rank_00_optim_states.pt",
    ]
    assert "mp_rank_00_model_states.pt" in files_of_rank(names, 0, 2)
