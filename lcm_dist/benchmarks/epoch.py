"""A million-image epoch: ``python launch/bench.py scale --train``.

Trains a tiny model (32x32 images, 368 floats of phi per image, a 10,804-parameter generator,
one inner step per batch) on two ``torchrun`` processes of one thread each, with the latents
paged through the run's Zarr store: two epochs over 1,000,000 images, then as many steps over
10,000 images (about 200 epochs). Epoch 0 starts every row from the shared init (nothing to
read); later epochs are the steady state: every chunk read and written back once. It reports,
from the runs themselves:

- ``rows_once_<N>``: every row trained exactly once in each epoch (``log.trace_rows``);
- ``io_amplification_<N>``: store bytes read and written per epoch after the first, over all
  processes, against twice the store's size (a read and a write of every row: 1.0);
- ``rss_ratio``: the largest peak resident memory of a training process at 1,000,000 images
  over that at 10,000 after as many steps (``rss_ratio_worker``: of a loader worker);
  ``peak_rss_bytes_<N>_per_rank`` shows the spread between the two processes of one run;
- ``images_per_s_<N>``: images trained per second, both processes together.

Peak RSS here is the memory in use: the training processes run with glibc's mmap threshold
fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so the megabytes a step frees go back to the kernel.
With the trainer's CPU default (``lcm_dist/memory.py`` keeps freed memory on the heap for speed;
``--keep-freed-memory`` runs with it) the peak is the heap's high-water mark: the step's
transient tensors (~400 MB at a batch of 1,024) fragment the heap differently in every process:
the two ranks of one run differed by 29 to 103 MB over five runs (3 to 21 MB returning freed
memory), as much as the whole gap between the sizes that the cache does not explain.

The shard set is real (WebDataset tars, a manifest, keys, PNG images decoded by the loader);
to write a million images in a minute rather than an hour, its images are 4,096 random crops
of scikit-image's photos, encoded once and repeated under distinct keys.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lcm_dist.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLES_PER_SHARD = 1024
DISTINCT_IMAGES = 4096
MMAP_THRESHOLD = 1 << 20
SMALL_IMAGES = 10_000  # the size the large set is compared with
TINY_MODEL = {
    "preset": "demo32",
    "noise_size": 12,
    "latent_widths": [4, 8],
    "gen_encoder_widths": [8, 8, 8],
    "gen_decoder_widths": [8, 8, 8, 8],
    "gen_head_widths": [8, 4],
}


def write_repeated_shards(out: Path, num_images: int) -> float:
    """``num_images`` samples in shards of 1,024 under ``out``; returns the seconds taken."""
    import io

    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    encoded = []
    for _, image in random_crops(min(DISTINCT_IMAGES, num_images), 32, seed=7):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    samples = ((f"image-{i:09d}", encoded[i % len(encoded)]) for i in range(num_images))
    start = time.perf_counter()
    write_shards(samples, out, 32, SAMPLES_PER_SHARD, progress=False)
    return time.perf_counter() - start


def epoch_steps(shards: Path, batch: int) -> int:
    from lcm_dist.data.plan import steps_per_epoch
    from lcm_dist.data.shards import load_manifest

    return steps_per_epoch(load_manifest(shards), 2, batch)


def run_config(tmp: Path, shards: Path, num_images: int, batch: int, epochs: int) -> dict:
    steps = epoch_steps(shards, batch)
    return {
        "run_dir": str(tmp / f"run-{num_images}"),
        "model": TINY_MODEL,
        "data": {"shards": str(shards), "batch_size": batch, "num_workers": 1},
        "train": {"max_steps": epochs * steps, "inner_steps": 1},
        "store": {"cache_bytes": 64 << 20},
        "checkpoint": {"every_steps": 0},
        "log": {"every_steps": 100, "image_every_steps": 0, "progress": False, "trace_rows": True},
        "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
    }


def child(config_path: str, report_dir: str) -> None:
    """One training process under torchrun: train, then write this process's report."""
    from lcm_dist.config import load_config
    from lcm_dist.memory import keep_freed_memory
    from lcm_dist.train.loop import train

    start = time.perf_counter()
    run = train(load_config(config_path))
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_worker_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "epoch_io": run.epoch_io,
        # The trainer set it (or not) at its start; asking again changes nothing.
        "keeps_freed_memory": keep_freed_memory(),
    }
    Path(report_dir, f"report-rank{rank}.json").write_text(json.dumps(report))


def rows_once(run_dir: Path, num_images: int, epochs: int) -> bool:
    """Every row trained exactly once in each epoch, by the run's row trace."""
    import numpy as np

    seen: dict[tuple[int, int], dict] = {}
    for path in sorted((run_dir / "trace").glob("rows-rank*.jsonl")):
        rank = int(path.stem.removeprefix("rows-rank"))
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if "rows" in record:
                    seen[(rank, record["step"])] = record
    for epoch in range(epochs):
        rows = [r for rec in seen.values() if rec["epoch"] == epoch for r in rec["rows"]]
        counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=num_images)
        if len(counts) != num_images or not (counts == 1).all():
            return False
    return True


def one_size(
    tmp: Path,
    num_images: int,
    batch: int,
    epochs: int,
    steps: int = 0,
    keep_freed_memory: bool = False,
) -> dict:
    """Train ``epochs`` epochs of ``num_images`` (or, given ``steps``, the epochs that make at
    least that many steps) and report what the run measured."""
    from lcm_dist.latents.store import LatentStore

    shards = tmp / f"shards-{num_images}"
    print(f"writing {num_images:,} images as shards ...", file=sys.stderr, flush=True)
    write_seconds = write_repeated_shards(shards, num_images)
    if steps:
        epochs = max(2, -(-steps // epoch_steps(shards, batch)))
    cfg = run_config(tmp, shards, num_images, batch, epochs)
    config_path = tmp / f"config-{num_images}.json"
    config_path.write_text(json.dumps(cfg))
    reports = tmp / f"reports-{num_images}"
    reports.mkdir()
    print(f"training {epochs} epochs of {num_images:,} images ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), "-m", "lcm_dist.benchmarks.epoch"]
    cmd += [str(config_path), str(reports)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if not keep_freed_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # the trainer then leaves malloc be
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training {num_images} images failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(reports.glob("report-rank*.json"))]
    store = LatentStore.open(str(Path(cfg["run_dir"]) / "latents.zarr"))
    last = {k: sum(r["epoch_io"][-1][k] for r in ranks) for k in ranks[0]["epoch_io"][-1]}
    first = {k: sum(r["epoch_io"][0][k] for r in ranks) for k in ranks[0]["epoch_io"][0]}
    moved = (last["store/bytes_read"] - first["store/bytes_read"]) + (
        last["store/bytes_written"] - first["store/bytes_written"]
    )
    seconds = max(r["seconds"] for r in ranks)
    return {
        f"write_shards_seconds_{num_images}": round(write_seconds, 1),
        f"train_seconds_{num_images}": round(seconds, 1),
        f"images_per_s_{num_images}": round(epochs * num_images / seconds, 1),
        f"rows_once_{num_images}": rows_once(Path(cfg["run_dir"]), num_images, epochs),
        f"store_bytes_{num_images}": store.nbytes,
        f"epoch0_bytes_written_{num_images}": first["store/bytes_written"],
        f"later_epochs_bytes_read_{num_images}": last["store/bytes_read"]
        - first["store/bytes_read"],
        f"later_epochs_bytes_written_{num_images}": last["store/bytes_written"]
        - first["store/bytes_written"],
        f"epochs_{num_images}": epochs,
        f"steps_{num_images}": cfg["train"]["max_steps"],
        # per epoch after the first
        f"io_amplification_{num_images}": round(moved / (2 * store.nbytes * (epochs - 1)), 4),
        f"peak_rss_bytes_{num_images}": max(r["peak_rss_bytes"] for r in ranks),
        f"peak_rss_bytes_{num_images}_per_rank": [r["peak_rss_bytes"] for r in ranks],
        f"keeps_freed_memory_{num_images}": all(r["keeps_freed_memory"] for r in ranks),
        f"peak_rss_worker_bytes_{num_images}": max(r["peak_rss_worker_bytes"] for r in ranks),
        f"peak_cache_bytes_{num_images}": max(
            r["epoch_io"][-1]["store/peak_resident_bytes"] for r in ranks
        ),
    }


def bench_scale_train(
    small: int = SMALL_IMAGES,
    large: int = 1_000_000,
    batch: int = 1024,
    epochs: int = 2,
    keep_freed_memory: bool = False,
) -> dict:
    if epochs < 2:
        raise ValueError("the scale --train benchmark needs 2 epochs (epoch 1 is the steady state)")
    if large <= small:
        raise ValueError(f"the large set ({large:,} images) must be larger than {small:,}")
    result: dict = {"processes": 2, "batch_size": batch, "epochs": epochs, "phi_size": 368}
    result["malloc"] = (
        "keeps freed memory (the trainer's CPU default)"
        if keep_freed_memory
        else f"mmap threshold {MMAP_THRESHOLD >> 20} MiB (freed memory returned)"
    )
    with tempfile.TemporaryDirectory(prefix="lcm-bench-epoch-") as name:
        result.update(one_size(Path(name), large, batch, epochs, 0, keep_freed_memory))
        # The small set trains as many steps as the large one (many more epochs): a process's
        # peak RSS creeps up with the steps it has run (the allocator's heap), whatever the
        # number of images, and that is not what this compares.
        steps = result[f"steps_{large}"]
        result.update(one_size(Path(name), small, batch, epochs, steps, keep_freed_memory))
    result["rss_ratio"] = round(
        result[f"peak_rss_bytes_{large}"] / result[f"peak_rss_bytes_{small}"], 4
    )
    result["rss_ratio_worker"] = round(
        result[f"peak_rss_worker_bytes_{large}"] / result[f"peak_rss_worker_bytes_{small}"], 4
    )
    result["targets"] = {
        f"rows_once_{large}": True,
        f"io_amplification_{large}": "<= 1.02",
        "rss_ratio": "<= 1.10",
    }
    return result


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
