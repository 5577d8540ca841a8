"""Memory bounded by the configuration, not the dataset: N = 1,000,000 vs N = 10,000.

Each size runs in a fresh child process (so its peak RSS is its own) that trains the demo32
model (the paper's P = 24,448 floats per image, ~98 GB of phi at a million images) for a few
hundred steps with the latents paged through a new Zarr store. The dataset is synthetic in
one way only: the manifest lists all N rows in shards of 1,024, but only the shards the run
reaches in its first steps are written (real photo crops); the others are never opened, and
writing a million images would only time the PNG encoder. ``create_seconds`` is the time to
create the 1,000,000-row store.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SAMPLES_PER_SHARD = 1024
BATCH = 16


def synthetic_shards(out: str, num_rows: int, steps: int, seed: int = 0) -> dict:
    """A manifest of ``num_rows`` rows, with the shards that the first ``steps`` batches of
    rank 0 (of 1) read in epoch 0 written for real."""
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.plan import shards_for_rank
    from lcm_dist.data.shards import add_sample, open_shard

    num_shards = -(-num_rows // SAMPLES_PER_SHARD)
    entries = [
        {
            "name": f"shard-{k:06d}.tar",
            "first_row": k * SAMPLES_PER_SHARD,
            "count": min(SAMPLES_PER_SHARD, num_rows - k * SAMPLES_PER_SHARD),
            "sha256": "not written (synthetic benchmark set)",
            "bytes": 0,
        }
        for k in range(num_shards)
    ]
    needed = -(-(steps * BATCH + 256) // SAMPLES_PER_SHARD) + 1
    for k in shards_for_rank(num_shards, seed, 0, 0, 1)[:needed]:
        entry = entries[k]
        with open_shard(os.path.join(out, entry["name"])) as tar:
            crops = random_crops(entry["count"], 32, seed=k)
            for row, (key, image) in enumerate(crops, start=entry["first_row"]):
                add_sample(tar, row, key, image, "png")
    manifest = {
        "format": "lcm-dist-shards",
        "version": 1,
        "image_size": 32,
        "channels": 3,
        "image_format": "png",
        "samples_per_shard": SAMPLES_PER_SHARD,
        "num_samples": num_rows,
        "keys_file": "keys.txt",
        "shards": entries,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def child(num_rows: int, steps: int, tmp: str) -> dict:
    """Run in the child process: train on a fresh store and report peak RSS."""
    from lcm_dist.config import config_from_dict
    from lcm_dist.train.loop import train

    shards = os.path.join(tmp, f"shards-{num_rows}")
    os.makedirs(shards)
    synthetic_shards(shards, num_rows, steps)
    cfg = config_from_dict(
        {
            "run_dir": os.path.join(tmp, f"run-{num_rows}"),
            "model": {"preset": "demo32"},
            "data": {"shards": shards, "batch_size": BATCH, "num_workers": 0, "shuffle_buffer": 64},
            "train": {"max_steps": steps, "inner_steps": 1},
            "store": {"cache_bytes": 256 << 20},
            "log": {"every_steps": 1000, "image_every_steps": 0, "progress": False},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
        }
    )
    start = time.perf_counter()
    run = train(cfg)
    return {
        "num_rows": num_rows,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "train_seconds": round(time.perf_counter() - start, 2),
        "step_ms": round(1000 * sum(run.step_seconds[5:]) / max(1, len(run.step_seconds) - 5), 2),
        "peak_cache_bytes": run.epoch_io[-1]["store/peak_resident_bytes"],
    }


def bench_scale(
    small: int = 10_000, large: int = 1_000_000, steps: int = 300, rounds: int = 2
) -> dict:
    import numpy as np

    from lcm_dist.latents.store import LatentStore

    result: dict = {"steps": steps, "batch_size": BATCH, "phi_size": 24_448}
    with tempfile.TemporaryDirectory(prefix="lcm-bench-scale-") as tmp:
        start = time.perf_counter()
        store = LatentStore.create(
            os.path.join(tmp, "created.zarr"),
            num_rows=large,
            initial=np.zeros(24_448, dtype=np.float32),
            signature={"phi_size": 24_448},
            rows_per_chunk=64,
        )
        result["create_seconds"] = round(time.perf_counter() - start, 4)
        result["logical_store_bytes"] = store.nbytes
        # Peak RSS of one process varies by ~10% run to run (allocator arenas of the I/O and
        # loader threads); each size runs `rounds` times, alternating, and its largest peak
        # counts. MALLOC_ARENA_MAX narrows the spread for both sizes alike.
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        runs: dict[int, list[dict]] = {small: [], large: []}
        for r in range(rounds):
            for n in (small, large):
                work = os.path.join(tmp, f"r{r}")
                os.makedirs(work, exist_ok=True)
                cmd = [sys.executable, "-m", "lcm_dist.benchmarks.scale", str(n), str(steps), work]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"scale child for N={n} failed:\n{done.stderr[-3000:]}")
                runs[n].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for n in (small, large):
            result[f"peak_rss_bytes_{n}"] = max(run["peak_rss_bytes"] for run in runs[n])
            result[f"peak_rss_bytes_{n}_runs"] = [run["peak_rss_bytes"] for run in runs[n]]
            result[f"peak_cache_bytes_{n}"] = max(run["peak_cache_bytes"] for run in runs[n])
            result[f"step_ms_{n}"] = min(run["step_ms"] for run in runs[n])
        result["rss_ratio"] = round(
            result[f"peak_rss_bytes_{large}"] / result[f"peak_rss_bytes_{small}"], 4
        )
    result["targets"] = {"create_seconds": "< 5", "rss_ratio": "<= 1.10"}
    return result


if __name__ == "__main__":
    n, s, t = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    report = child(n, s, t)
    print(json.dumps(report), flush=True)
