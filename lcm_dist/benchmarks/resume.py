"""Verifying a checkpoint on resume, 8 processes: ``python launch/bench.py resume``.

Trains a ``demo64`` run for one batch on 8 ``torchrun`` processes under ZeRO stage 2 (so the
checkpoint has shared files and per-process optimizer files), then starts 8 processes together
that each read the newest commit as a resume does, two ways in turn: every process hashing every
file of the checkpoint (``all_files``, the old way), and each file hashed by one process
(``commits.files_of_rank``: rank 0 the shared files, each rank its own; the way resumes run
now). It reports the slowest process's seconds for each, over ``rounds`` alternating rounds
(the median), the bytes each way reads, and ``speedup``. The files are in the page cache for
both ways alike (just written, then read every round); on shared storage each byte read costs
the network too, which makes the old way's 8x reading worse than here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lcm_dist.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 8


def _train(tmp: Path) -> Path:
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    shards = tmp / "shards"
    write_shards(random_crops(64, 64, seed=1), shards, 64, 8, progress=False)
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"preset": "demo64"},
        "data": {"shards": str(shards), "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": 1, "inner_steps": 1},
        "log": {"every_steps": 1, "image_every_steps": 0, "progress": False},
        "deepspeed": {
            "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
            "zero_optimization": {"stage": 2},
        },
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES)]
    cmd += ["--master_port", str(free_port()), str(REPO / "launch" / "train.py")]
    cmd += ["--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training on {PROCESSES} processes failed:\n{done.stderr[-3000:]}")
    return tmp / "run"


def _verify(run_dir: str, rank: int, share: bool, start, out) -> None:
    from lcm_dist.commits import files_of_rank, find_latest

    pick = (lambda names: files_of_rank(names, rank, PROCESSES)) if share else None
    start.wait()
    began = time.perf_counter()
    find_latest(run_dir, verify=pick)
    out.put(time.perf_counter() - began)


def _round(run_dir: Path, share: bool) -> float:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_verify, args=(str(run_dir), r, share, start, out))
        for r in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    seconds = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(seconds)


def bench_resume(rounds: int = 5) -> dict:
    from lcm_dist.commits import POINTER, files_of_rank

    with tempfile.TemporaryDirectory(prefix="lcm-bench-resume-") as name:
        print(f"training one batch on {PROCESSES} processes ...", file=sys.stderr, flush=True)
        run_dir = _train(Path(name))
        files = json.loads((run_dir / POINTER).read_text())["files"]
        total = sum(size for size, _ in files.values())
        shared = [
            sum(files[n][0] for n in files_of_rank(list(files), r, PROCESSES))
            for r in range(PROCESSES)
        ]
        times: dict[str, list[float]] = {"all_files": [], "own_share": []}
        for _ in range(rounds):
            times["all_files"].append(_round(run_dir, share=False))
            times["own_share"].append(_round(run_dir, share=True))
    before, after = (statistics.median(times[k]) for k in ("all_files", "own_share"))
    return {
        "processes": PROCESSES,
        "checkpoint_files": len(files),
        "checkpoint_bytes": total,
        "bytes_read_all_files": PROCESSES * total,
        "bytes_read_own_share": sum(shared),
        "largest_share_bytes": max(shared),
        "seconds_all_files": round(before, 3),
        "seconds_own_share": round(after, 3),
        "rounds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "speedup": round(before / after, 2),
    }
