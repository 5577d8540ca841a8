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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lcm_dist.config import RunConfig
from lcm_dist.data.plan import batch_sizes, chunk_need_order, shards_for_rank, steps_per_epoch
from lcm_dist.latents.cache import WriteBackCache
from lcm_dist.latents.format import IOCounters
from lcm_dist.latents.layout import chunk_bounds


class SyntheticShards(Sequence):
    """The shard entries of ``synthetic_manifest``, made when asked for: a plan for a billion
    images indexes a few thousand of its million shards."""

    def __init__(self, num_images: int, samples_per_shard: int):
        self.num_images, self.samples_per_shard = num_images, samples_per_shard

    def __len__(self) -> int:
        return -(-self.num_images // self.samples_per_shard)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        first = k * self.samples_per_shard
        count = min(self.samples_per_shard, self.num_images - first)
        return {"name": f"shard-{k:06d}.tar", "first_row": first, "count": count}


def synthetic_manifest(num_images: int, samples_per_shard: int, image_size: int) -> dict:
    """The manifest that ``launch/make_shards.py --samples-per-shard S`` writes for
    ``num_images`` images (shard bytes unknown)."""
    if num_images <= 0 or samples_per_shard <= 0:
        raise ValueError("--images and --samples-per-shard must be positive")
    return {
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "num_samples": num_images,
        "shards": SyntheticShards(num_images, samples_per_shard),
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
    moved, only the traffic counted (chunks never written read as ``initial``, at no cost).
    ``again`` counts the rows of reads and writes of a chunk already read or written in the
    epoch (``new_epoch`` starts one): what a too small budget adds to the traffic."""

    def __init__(self, num_rows: int, rows_per_chunk: int):
        self.url = "(plan)"
        self.num_rows, self.rows_per_chunk, self.phi_size = num_rows, rows_per_chunk, 1
        self.stall_warning_seconds = 0.0
        self.last_error = None
        self.counters = IOCounters()
        self.written: set[int] = set()
        self.all_written = False
        """Every chunk has been written (by some process): all reads cost."""
        self.again = {"read": 0, "write": 0}
        self._seen: dict[str, set[int]] = {"read": set(), "write": set()}
        self._lock = threading.Lock()

    def new_epoch(self) -> None:
        with self._lock:
            self._seen = {"read": set(), "write": set()}

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.rows_per_chunk, self.num_rows)

    def _rows(self, chunk: int) -> int:
        lo, hi = self.chunk_bounds(chunk)
        return hi - lo

    def _count(self, kind: str, chunk: int) -> None:
        if chunk in self._seen[kind]:
            self.again[kind] += self._rows(chunk)
        self._seen[kind].add(chunk)

    def read_chunk(self, chunk: int, abort=None) -> np.ndarray:
        with self._lock:
            # A first read of a chunk never written is free but still its one read this epoch.
            self._count("read", chunk)
            if self.all_written or chunk in self.written:
                self.counters.bytes_read += self._rows(chunk)  # rows, scaled by the caller
                self.counters.chunk_reads += 1
        return np.zeros((self._rows(chunk), 1), dtype=np.float32)

    def write_chunk(self, chunk: int, data: np.ndarray, abort=None) -> None:
        with self._lock:
            self.written.add(chunk)
            self.counters.bytes_written += self._rows(chunk)
            self.counters.chunk_writes += 1
            self._count("write", chunk)


def _settle(cache: WriteBackCache) -> None:
    """Wait until the cache's background reads and writes are done, as a store that keeps up
    has done by the end of the batch's compute."""
    with cache._cond:
        while any(e.state != "ready" for e in cache._entries.values()):
            cache._cond.wait(timeout=1.0)


FULL_REPLAY_STEPS = 1_000
"""Epochs of at most this many batches per process are replayed whole; longer ones are sampled."""
WINDOW_STEPS = 400
"""A sampled epoch replays this many batches from its start (more if needed to reach
``WINDOW_ROUNDS`` shards per loader worker) and scales what the later part of them moved."""
WINDOW_ROUNDS = 4


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
    replayed_steps: int = 0
    """Batches replayed; fewer than the epoch's when it was sampled."""
    steps: int = 0
    """The epoch's batches."""


def window_steps(steps: int, batch_size: int, num_workers: int, samples_per_shard: int) -> int:
    """How many of an epoch's ``steps`` batches the replay runs: all of a short epoch; of a long
    one, ``WINDOW_STEPS`` or enough for ``WINDOW_ROUNDS`` shards per loader worker."""
    if steps <= FULL_REPLAY_STEPS:
        return steps
    rounds = -(-WINDOW_ROUNDS * max(1, num_workers) * samples_per_shard // batch_size)
    return min(steps, max(WINDOW_STEPS, rounds))


def _window_shards(shard_ids: list[int], num_workers: int, manifest: dict, rows: int) -> list:
    """The first shards of each loader worker's list, enough that the epoch's first ``rows``
    samples are the same as with all of them. The round robin puts a worker's i-th sample at a
    position set by the workers' counts only up to i: keeping m shards of each worker (at least
    m x the smallest shard's samples of each, or all of a worker's) leaves the first
    sum_w min(n_w, m x smallest) positions as they were."""
    workers = max(1, num_workers)
    entries = [manifest["shards"][i] for i in shard_ids]
    smallest = min(e["count"] for e in entries)
    counts = [sum(e["count"] for e in entries[w::workers]) for w in range(workers)]
    m = 1
    while sum(min(n, m * smallest) for n in counts) < rows and m * workers < len(shard_ids):
        m += 1
    return shard_ids[: m * workers]


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
    P x the storage itemsize for traffic, float32 for the cache (as the run counts them).

    An epoch of more than ``FULL_REPLAY_STEPS`` batches is sampled: its first batches are
    replayed (``window_steps``), and the traffic of the second half of them, past the cache's
    filling at the epoch's start, is scaled to the epoch's rows. The layout repeats (every
    shard is the same number of chunks, every worker's stream the same block shuffle), so the
    rate holds; the cache's peak and the partly trained data are the window's; checkpoints in
    the epoch each write back the window's mean partly trained data."""
    d = cfg.data
    store = _CountingStore(manifest["num_samples"], rows_per_chunk)
    row_bytes = phi_size * 4
    # The cache measures its budget in float32 rows; with one float per row, a budget of
    # floor(cache_bytes / row_bytes) rows admits exactly the chunks the real one admits.
    budget = cfg.store.cache_bytes // row_bytes * 4
    cache = WriteBackCache(store, budget, cfg.store.io_threads, cfg.store.prefetch_chunks)
    steps = steps_per_epoch(manifest, world, d.batch_size)
    window = window_steps(steps, d.batch_size, d.num_workers, manifest["samples_per_shard"])
    itemsize = np.dtype(cfg.store.dtype).itemsize
    every = cfg.checkpoint.every_steps
    results = []
    try:
        for epoch in range(epochs):
            ids = shards_for_rank(len(manifest["shards"]), cfg.train.seed, epoch, rank, world)
            own = sum(manifest["shards"][i]["count"] for i in ids)
            sizes = batch_sizes(own, steps)
            if window < steps:
                # Enough shards for the window and the cache's read-ahead past its end.
                ahead = (
                    cfg.store.prefetch_chunks * rows_per_chunk + d.num_workers * d.shuffle_buffer
                )
                ids = _window_shards(ids, d.num_workers, manifest, sum(sizes[:window]) + ahead)
            order = epoch_row_order(
                manifest, ids, d.num_workers, d.shuffle_buffer, cfg.train.seed, epoch, rank
            )
            cache.peak_resident = 0
            cache.begin_epoch(chunk_need_order(manifest, ids, d.num_workers, rows_per_chunk))
            store.new_epoch()
            result = _replay_epoch(cache, store, order, sizes, window, epoch * steps, every)
            if window < steps:
                # Each of the process's chunks is written once and, once trained, read once;
                # what the window did again, scaled, comes on top.
                result["rows_read"] += own if epoch else 0
                result["rows_written"] += own
                result["chunk_reads"] += own / rows_per_chunk if epoch else 0
                result["chunk_writes"] += own / rows_per_chunk
            # Every row has now been trained by some process: from the next epoch on, every
            # chunk this process needs is read from the store.
            store.all_written = True
            scale = phi_size * itemsize
            results.append(
                EpochIO(
                    bytes_read=round(result["rows_read"] * scale),
                    bytes_written=round(result["rows_written"] * scale),
                    chunk_reads=round(result["chunk_reads"]),
                    chunk_writes=round(result["chunk_writes"]),
                    checkpoint_bytes_written=round(result["flushed"] * scale),
                    dirty_peak_bytes=result["dirty_peak"] * scale,
                    peak_resident_bytes=cache.peak_resident // 4 * row_bytes,
                    replayed_steps=window,
                    steps=steps,
                )
            )
    finally:
        cache.close()
    return results


def _replay_epoch(cache, store, order, sizes, window, first_step, every) -> dict:
    """Drive ``cache`` through an epoch's first ``window`` batches of ``sizes`` (rows from
    ``order``); the epoch's traffic in rows and chunks, whole or scaled from the window."""
    c = store.counters
    before = IOCounters(**vars(c))
    flushed, dirty_peak, dirty_sum, start = 0, 0, 0, 0
    mark, mark_rows = None, 0
    sampled = window < len(sizes)
    for k, size in enumerate(sizes[:window]):
        if sampled and k == window // 2:
            mark = {"again_read": store.again["read"], "again_write": store.again["write"]}
            mark_rows = start
        rows = order[start : start + size]
        start += size
        values = cache.read_rows(rows)
        cache.write_rows(rows, values)
        _settle(cache)
        # A checkpoint now would write back the chunks the epoch is still working on.
        with cache._cond:
            dirty = sum(e.nbytes // 4 for e in cache._entries.values() if e.dirty)
        dirty_peak = max(dirty_peak, dirty)
        dirty_sum += dirty
        if not sampled and every and (first_step + k + 1) % every == 0:
            cache.flush()
            flushed += dirty
    if not sampled:
        cache.end_epoch()
        return {
            "rows_read": c.bytes_read - before.bytes_read,
            "rows_written": c.bytes_written - before.bytes_written,
            "chunk_reads": c.chunk_reads - before.chunk_reads,
            "chunk_writes": c.chunk_writes - before.chunk_writes,
            "flushed": flushed,
            "dirty_peak": dirty_peak,
        }
    # The later half of the window is past the cache's first reads ahead: the rows it read or
    # wrote again per row trained, times the epoch's rows (the caller adds each chunk's one read
    # and write), plus a write-back of the window's mean partly trained data per checkpoint.
    rate = sum(sizes) / (start - mark_rows)
    again_read = (store.again["read"] - mark["again_read"]) * rate
    again_written = (store.again["write"] - mark["again_write"]) * rate
    checkpoints = (first_step + len(sizes)) // every - first_step // every if every else 0
    flushed = checkpoints * dirty_sum / window
    cache.end_epoch()  # leaves the cache empty for the next epoch (not counted)
    return {
        "rows_read": again_read,
        "rows_written": again_written + flushed,
        "chunk_reads": again_read / store.rows_per_chunk,
        "chunk_writes": (again_written + flushed) / store.rows_per_chunk,
        "flushed": flushed,
        "dirty_peak": dirty_peak,
    }
