"""What a person reads: errors after the progress bar, the cause last in a failed run."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, free_port, run_config, run_script, subprocess_env


def broken_shards(tmp_path):
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(random_crops(64, 32, seed=1), shards, 32, 8, progress=False)
    broken = shards / "shard-000002.tar"
    broken.write_bytes(broken.read_bytes()[:1600])  # truncated inside an image
    return shards


def test_an_error_is_a_line_of_its_own_after_the_closed_progress_bar(tmp_path):
    cfg = run_config(
        tmp_path, broken_shards(tmp_path), train={"max_steps": 40}, log={"progress": True}
    )
    proc = run_script("launch/train.py", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: cannot read shard"), proc.stderr[-3000:]
    assert "batch/s" in lines[-2]  # the bar, closed: its last state ends the line before
    assert "\r" not in lines[-1]


def test_closing_open_loggers_closes_a_bar_whose_run_never_started(tmp_path):
    from lcm_dist.train.monitor import RunLogger, close_open_loggers

    log = RunLogger(str(tmp_path), total_steps=10, progress=True)
    close_open_loggers()
    assert log.bar is None


def test_end_with_error_orders_the_lines_of_a_multi_process_run(tmp_path, monkeypatch, capsys):
    from lcm_dist import lifecycle

    slept = []
    monkeypatch.setattr(lifecycle.time, "sleep", slept.append)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert lifecycle.end_with_error("process 0 stopped (its error follows)", cause=False) == 2
    assert not error_file.exists()
    assert lifecycle.end_with_error("cannot read shard s") == 2
    assert slept == [
        lifecycle.PEER_DELAY_SECONDS,
        lifecycle.PEER_WAIT_SECONDS,
        lifecycle.CAUSE_DELAY_SECONDS,
    ]
    assert lifecycle.PEER_DELAY_SECONDS < lifecycle.CAUSE_DELAY_SECONDS
    assert capsys.readouterr().err.splitlines() == [
        "lcm-dist: process 1 stops too: process 0 stopped (its error follows)",
        "error: cannot read shard s",
    ]
    record = json.loads(error_file.read_text())["message"]
    assert record["extraInfo"]["py_callstack"] == "error: cannot read shard s"


@pytest.mark.slow
@pytest.mark.dist
def test_the_cause_of_a_failed_two_process_run_is_what_torchrun_ends_with(tmp_path):
    cfg = run_config(tmp_path, broken_shards(tmp_path), train={"max_steps": 40})
    cmd = [
        *(PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port()), "launch/train.py", "--config", str(cfg)),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    err = proc.stderr
    assert proc.returncode != 0
    cause = next(line for line in err.splitlines() if line.startswith("error: "))
    assert cause.startswith("error: cannot read shard") and "shard-000002.tar" in cause
    peer = next(line for line in err.splitlines() if " stops too: " in line)
    assert "(its error follows)" in peer and err.index(peer) < err.index(cause)
    root = err[err.index("Root Cause (first observed failure)") :]
    assert f"traceback : {cause}" in root, err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err


def test_make_shards_help_and_png_output_say_what_is_required_and_written(tmp_path):
    from PIL import Image

    usage = run_script("launch/make_shards.py", "--help").stdout.split("\n\n")[0]
    assert "SOURCE [SOURCE ...] --out FOLDER" in usage and "--verify FOLDER" in usage
    proc = run_script("launch/make_shards.py", str(tmp_path))
    assert proc.returncode == 2 and "--out is required (unless --verify" in proc.stderr
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(tmp_path / f"p{i}.png")
    out = tmp_path / "png"
    proc = run_script(
        "launch/make_shards.py",
        *(str(tmp_path / f"p{i}.png") for i in range(3)),
        "--png",
        "--out",
        str(out),
        "--image-size",
        "16",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 3 PNG files (000000.png ...) and keys.txt to {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "keys.txt",
    ]


def test_a_failed_command_removes_the_empty_output_folders_it_made(tmp_path):
    from lcm_dist.files import output_folder

    kept = tmp_path / "kept"
    kept.mkdir()
    for folder in (tmp_path / "new" / "out", kept):
        with pytest.raises(KeyError), output_folder(folder, "output folder"):
            assert folder.is_dir()
            raise KeyError("the command failed")
    assert not (tmp_path / "new").exists() and kept.is_dir()
    with pytest.raises(KeyError), output_folder(tmp_path / "written", "output folder") as out:
        (out / "a.png").write_bytes(b"")
        raise KeyError("the command failed after writing")
    assert (tmp_path / "written" / "a.png").exists()


def test_evaluate_that_fails_on_its_model_leaves_no_output_folder(tmp_path):
    out = tmp_path / "eval" / "out"
    proc = run_script(
        "launch/evaluate.py",
        "--model",
        str(tmp_path / "missing.zarr"),
        "--task",
        "inpaint",
        "--images",
        str(tmp_path),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert not (tmp_path / "eval").exists()


def test_deepspeed_logs_errors_only_unless_verbose(monkeypatch):
    import logging
    import warnings

    from deepspeed.utils.logging import logger

    from lcm_dist import distributed

    before = [logger.level, *(h.level for h in logger.handlers)]
    try:
        with warnings.catch_warnings():  # the filters it adds stay inside
            for verbose, level in ((True, logging.INFO), (False, logging.ERROR)):
                monkeypatch.setattr(distributed, "_verbose", verbose)
                distributed._quiet_libraries()
                assert logger.level == level and all(h.level == level for h in logger.handlers)
    finally:
        logger.setLevel(before[0])
        for handler, level in zip(logger.handlers, before[1:], strict=True):
            handler.setLevel(level)
