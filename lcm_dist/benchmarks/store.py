"""Paging latents through the Zarr store vs holding them all in RAM, in one run.

The demo32 model keeps the paper's latent net (P = 24,448 floats, ~98 KB per image), so the
bytes moved per image are the real ones. Each configuration trains the same steps on the same
shards twice, alternating in-RAM and store-backed runs so that machine noise hits both sides;
the ratio compares the summed step times after a warm-up (DeepSpeed and loader start-up are
not steps). ``io_amplification`` is (bytes read + written) / (2 x store bytes) over the second
epoch of the store-backed run: the first epoch reads nothing (every row starts as the initial
phi).
"""

from __future__ import annotations

import os
import tempfile

WARMUP_STEPS = 5


def bench_config(tmp: str, shards: str, name: str, in_ram: bool, inner: int, steps: int):
    from lcm_dist.config import config_from_dict

    return config_from_dict(
        {
            "run_dir": os.path.join(tmp, name),
            "model": {"preset": "demo32"},
            "data": {"shards": shards, "batch_size": 16, "num_workers": 1, "shuffle_buffer": 64},
            "train": {"max_steps": steps, "inner_steps": inner, "lr_phi": 1.0},
            # 4 chunks of 64 rows: half the store, so the cache really pages.
            "store": {"in_ram": in_ram, "cache_bytes": 4 * 64 * 24_448 * 4},
            "log": {"every_steps": 1000, "image_every_steps": 0, "progress": False},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}},
        },
        "benchmark config",
    )


def bench_store(images: int = 512, rounds: int = 2) -> dict:
    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards
    from lcm_dist.model.latent_net import phi_layout
    from lcm_dist.train.loop import train

    steps_per_epoch = images // 16
    result: dict = {"images": images, "phi_size": None, "batch_size": 16}
    with tempfile.TemporaryDirectory(prefix="lcm-bench-store-") as tmp:
        shards = os.path.join(tmp, "shards")
        write_shards(random_crops(images, 32, seed=3), shards, 32, 64, progress=False)
        for inner, key in ((4, "overhead_ratio"), (1, "overhead_ratio_inner1")):
            steps = 2 * steps_per_epoch + 2  # two whole epochs and the start of a third
            totals = {True: 0.0, False: 0.0}
            for r in range(rounds):
                for in_ram in (True, False):
                    name = f"{'ram' if in_ram else 'store'}-{inner}-{r}"
                    cfg = bench_config(tmp, shards, name, in_ram, inner, steps)
                    run = train(cfg)
                    totals[in_ram] += sum(run.step_seconds[WARMUP_STEPS:])
                    if not in_ram and inner == 4 and r == 0:
                        first, second = run.epoch_io[0], run.epoch_io[1]
                        moved = (second["store/bytes_read"] - first["store/bytes_read"]) + (
                            second["store/bytes_written"] - first["store/bytes_written"]
                        )
                        P = phi_layout(cfg.model).size
                        store_bytes = images * P * 4
                        result["phi_size"] = P
                        result["store_bytes"] = store_bytes
                        result["io_amplification"] = round(moved / (2 * store_bytes), 4)
                        result["io_wait_seconds_inner4"] = round(
                            run.epoch_io[-1]["store/io_wait_seconds"], 3
                        )
                        result["peak_cache_bytes"] = run.epoch_io[-1]["store/peak_resident_bytes"]
            result[key] = round(totals[False] / totals[True], 4)
            result[f"step_ms_ram_inner{inner}"] = round(
                1000 * totals[True] / (rounds * (steps - WARMUP_STEPS)), 2
            )
            result[f"step_ms_store_inner{inner}"] = round(
                1000 * totals[False] / (rounds * (steps - WARMUP_STEPS)), 2
            )
    result["targets"] = {
        "overhead_ratio": "<= 1.05",
        "overhead_ratio_inner1": "<= 1.25",
        "io_amplification": "<= 1.05",
    }
    return result
