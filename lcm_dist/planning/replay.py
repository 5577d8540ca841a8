"""One process's latent store traffic and cache peak, replayed before a run.

The real ``WriteBackCache`` is driven through the run's own batches (the epoch's shard plan,
each loader worker's block shuffle, the DataLoader's round-robin over workers, checkpoint
flushes) over a store stand-in that keeps one float per row and moves no data. So the traffic
it counts includes chunks that leave the cache early under a small budget and the partly
trained chunks a checkpoint writes back. Here the store finishes each read and write at once;
the cache decides what to read ahead, drop and let go on the step's thread from state that does
not depend on when I/O finishes, so a run's traffic and peak are the same as long as its store
finishes what a batch gave it during the next batch (the plan checks its bandwidth).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from lcm_dist.config import RunConfig
from lcm_dist.data.plan import batch_sizes, chunk_need_order, shards_for_rank, steps_per_epoch
from lcm_dist.latents.cache import WriteBackCache
from lcm_dist.latents.format import IOCounters
from lcm_dist.latents.layout import chunk_bounds, num_chunks


def synthetic_manifest(num_images: int, samples_per_shard: int, image_size: int) -> dict:
    """The manifest that ``launch/make_shards.py --samples-per-shard S`` writes for
    ``num_images`` images (shard bytes unknown)."""
    if num_images <= 0 or samples_per_shard <= 0:
        raise ValueError("--images and --samples-per-shard must be positive")
    shards = [
        {
            "name": f"shard-{k:06d}.tar",
            "first_row": first,
            "count": min(samples_per_shard, num_images - first),
        }
        for k, first in enumerate(range(0, num_images, samples_per_shard))
    ]
    return {
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "num_samples": num_images,
        "shards": shards,
    }


def epoch_row_order(
    manifest: dict,
    shard_ids: list[int],
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    rank: int,
) -> np.ndarray:
    """The rows one process trains in an epoch, in the order its ``ShardLoader`` yields them:
    each loader worker streams its shards (``shard_ids[w::W]``) block-shuffled in blocks of
    ``shuffle_buffer`` under ``(seed, epoch, rank, w)``, and the DataLoader takes one sample
    from each worker in turn, skipping workers that have run out."""
    workers = max(1, num_workers)
    block = max(1, shuffle_buffer)
    streams = []
    for w in range(workers):
        entries = [manifest["shards"][i] for i in shard_ids[w::workers]]
        rows = np.concatenate(
            [np.arange(e["first_row"], e["first_row"] + e["count"]) for e in entries]
            or [np.zeros(0, dtype=np.int64)]
        )
        rng = np.random.default_rng([seed, epoch, rank, w])
        parts = [rows[i : i + block] for i in range(0, rows.size, block)]
        streams.append([part[rng.permutation(part.size)] for part in parts])
    flat = [np.concatenate(s) if s else np.zeros(0, dtype=np.int64) for s in streams]
    order, position = [], [0] * workers
    while any(position[w] < flat[w].size for w in range(workers)):
        for w in range(workers):
            if position[w] < flat[w].size:
                order.append(flat[w][position[w]])
                position[w] += 1
    return np.asarray(order, dtype=np.int64)


class _CountingStore:
    """Stands in for a ``LatentStore`` under the real cache: one float per row and no data
    moved, only the traffic counted (chunks never written read as ``initial``, at no cost)."""

    def __init__(self, num_rows: int, rows_per_chunk: int):
        self.url = "(plan)"
        self.num_rows, self.rows_per_chunk, self.phi_size = num_rows, rows_per_chunk, 1
        self.stall_warning_seconds = 0.0
        self.last_error = None
        self.counters = IOCounters()
        self.written: set[int] = set()
        self._lock = threading.Lock()

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.rows_per_chunk, self.num_rows)

    def _rows(self, chunk: int) -> int:
        lo, hi = self.chunk_bounds(chunk)
        return hi - lo

    def read_chunk(self, chunk: int, abort=None) -> np.ndarray:
        with self._lock:
            if chunk in self.written:
                self.counters.bytes_read += self._rows(chunk)  # rows, scaled by the caller
                self.counters.chunk_reads += 1
        return np.zeros((self._rows(chunk), 1), dtype=np.float32)

    def write_chunk(self, chunk: int, data: np.ndarray, abort=None) -> None:
        with self._lock:
            self.written.add(chunk)
            self.counters.bytes_written += self._rows(chunk)
            self.counters.chunk_writes += 1


def _settle(cache: WriteBackCache) -> None:
    """Wait until the cache's background reads and writes are done, as a store that keeps up
    has done by the end of the batch's compute."""
    with cache._cond:
        while any(e.state != "ready" for e in cache._entries.values()):
            cache._cond.wait(timeout=1.0)


@dataclass
class EpochIO:
    """One process's latent store traffic in one epoch (logical bytes, as the run logs them)."""

    bytes_read: int
    bytes_written: int
    chunk_reads: int
    chunk_writes: int
    checkpoint_bytes_written: int
    """Of ``bytes_written``: partly trained chunks written back by checkpoints."""
    dirty_peak_bytes: int
    """The most partly trained data held after any batch: what a checkpoint may write back."""
    peak_resident_bytes: int


def replay_epochs(
    cfg: RunConfig,
    manifest: dict,
    world: int,
    rank: int,
    rows_per_chunk: int,
    phi_size: int,
    epochs: int = 2,
) -> list[EpochIO]:
    """One process's store traffic and cache peak in the first ``epochs`` epochs, from the real
    cache replaying the run's batches (checkpoint flushes included). Bytes are logical: rows x
    P x the storage itemsize for traffic, float32 for the cache (as the run counts them)."""
    d = cfg.data
    store = _CountingStore(manifest["num_samples"], rows_per_chunk)
    row_bytes = phi_size * 4
    # The cache measures its budget in float32 rows; with one float per row, a budget of
    # floor(cache_bytes / row_bytes) rows admits exactly the chunks the real one admits.
    budget = cfg.store.cache_bytes // row_bytes * 4
    cache = WriteBackCache(store, budget, cfg.store.io_threads, cfg.store.prefetch_chunks)
    steps = steps_per_epoch(manifest, world, d.batch_size)
    itemsize = np.dtype(cfg.store.dtype).itemsize
    results, step = [], 0
    try:
        for epoch in range(epochs):
            ids = shards_for_rank(len(manifest["shards"]), cfg.train.seed, epoch, rank, world)
            order = epoch_row_order(
                manifest, ids, d.num_workers, d.shuffle_buffer, cfg.train.seed, epoch, rank
            )
            before = IOCounters(**vars(store.counters))
            cache.peak_resident = 0
            cache.begin_epoch(chunk_need_order(manifest, ids, d.num_workers, rows_per_chunk))
            flushed, dirty_peak, start = 0, 0, 0
            for size in batch_sizes(order.size, steps):
                rows = order[start : start + size]
                start += size
                step += 1
                values = cache.read_rows(rows)
                cache.write_rows(rows, values)
                _settle(cache)
                # A checkpoint now would write back the chunks the epoch is still working on.
                with cache._cond:
                    dirty = sum(e.nbytes // 4 for e in cache._entries.values() if e.dirty)
                dirty_peak = max(dirty_peak, dirty)
                every = cfg.checkpoint.every_steps
                if every and step % every == 0:
                    cache.flush()
                    flushed += dirty
            cache.end_epoch()
            # Every row has now been trained by some process: from the next epoch on, every
            # chunk this process needs is read from the store.
            store.written.update(range(num_chunks(store.num_rows, rows_per_chunk)))
            c = store.counters
            results.append(
                EpochIO(
                    bytes_read=(c.bytes_read - before.bytes_read) * phi_size * itemsize,
                    bytes_written=(c.bytes_written - before.bytes_written) * phi_size * itemsize,
                    chunk_reads=c.chunk_reads - before.chunk_reads,
                    chunk_writes=c.chunk_writes - before.chunk_writes,
                    checkpoint_bytes_written=flushed * phi_size * itemsize,
                    dirty_peak_bytes=dirty_peak * phi_size * itemsize,
                    peak_resident_bytes=cache.peak_resident // 4 * row_bytes,
                )
            )
    finally:
        cache.close()
    return results
