"""Raw latent store bandwidth vs a plain file on the same disk, measured in one run.

The store writes and reads whole chunks of the paper's rows (64 rows x 24,448 float32 =
6.3 MB per chunk, no compression); the baseline writes and reads the same bytes, in the same
chunk-sized pieces, to one local file in the same folder. Both overwrite files that exist
(both of the store's slots and the plain file are written once before timing), as the trainer
does from its second epoch on. Neither side calls fsync, so both measure the path down to the
operating system's page cache, which is where the trainer's writes go too; the ratios show
what the store's per-chunk work costs on top. Each side runs ``rounds`` times, alternating,
and its best round counts.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROWS_PER_CHUNK = 64
P = 24_448


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_throughput(chunks: int = 32, rounds: int = 3, threads: int = 2) -> dict:
    from lcm_dist.latents.store import LatentStore

    data = np.random.default_rng(0).standard_normal((ROWS_PER_CHUNK, P)).astype(np.float32)
    total = chunks * data.nbytes
    with tempfile.TemporaryDirectory(prefix="lcm-bench-io-", dir=os.getcwd()) as tmp:
        store = LatentStore.create(
            os.path.join(tmp, "store.zarr"),
            num_rows=chunks * ROWS_PER_CHUNK,
            initial=np.zeros(P, dtype=np.float32),
            signature={"phi_size": P},
            rows_per_chunk=ROWS_PER_CHUNK,
        )
        path = os.path.join(tmp, "plain.bin")

        def store_write():
            for c in range(chunks):
                store.write_chunk(c, data)
            store.commit()

        def store_read():
            for c in range(chunks):
                store.read_chunk(c)

        def store_write_threads():
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda c: store.write_chunk(c, data), range(chunks)))
            store.commit()

        def store_read_threads():
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(store.read_chunk, range(chunks)))

        def file_write(mode="r+b"):
            with open(path, mode) as f:
                for _ in range(chunks):
                    f.write(memoryview(data).cast("B"))

        def file_read():
            out = np.empty_like(data)
            with open(path, "rb") as f:
                for _ in range(chunks):
                    f.readinto(memoryview(out).cast("B"))

        file_write("wb")
        store_write()  # slot 0, then
        store_write()  # slot 1: every later write overwrites a chunk file
        times = {name: [] for name in ("sw", "sr", "fw", "fr", "swt", "srt")}
        for _ in range(rounds):
            for name, fn in (
                ("fw", file_write),
                ("sw", store_write),
                ("fr", file_read),
                ("sr", store_read),
                ("swt", store_write_threads),
                ("srt", store_read_threads),
            ):
                times[name].append(_best(fn, 1))
    mbps = {k: total / min(v) / 1e6 for k, v in times.items()}
    return {
        "bytes": total,
        "chunk_bytes": data.nbytes,
        "store_write_MBps": round(mbps["sw"], 1),
        "store_read_MBps": round(mbps["sr"], 1),
        "file_write_MBps": round(mbps["fw"], 1),
        "file_read_MBps": round(mbps["fr"], 1),
        "write_vs_disk": round(mbps["sw"] / mbps["fw"], 4),
        "read_vs_disk": round(mbps["sr"] / mbps["fr"], 4),
        f"store_write_MBps_{threads}threads": round(mbps["swt"], 1),
        f"store_read_MBps_{threads}threads": round(mbps["srt"], 1),
    }
