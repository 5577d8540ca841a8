"""An epoch's plan for one rank: its shards, its batch sizes, where each loader worker's samples
land in its batches, and the order in which it needs the latent store's chunks.

Pure functions of the manifest and ``(seed, epoch, world_size, rank, num_workers)``: no I/O, so
any process (or the run planner, before a run) can compute any rank's plan.
"""

from __future__ import annotations

import math

import numpy as np


def shards_for_rank(num_shards: int, seed: int, epoch: int, rank: int, world_size: int) -> list:
    """The shard indices rank ``rank`` reads in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(i) for i in order[rank::world_size]]


def steps_per_epoch(manifest: dict, world_size: int, batch_size: int) -> int:
    """Steps per epoch, the same on every rank and in every epoch: enough for the largest
    share any rank can be dealt (ceil(shards / world) full shards) at ``batch_size``."""
    per_rank = math.ceil(len(manifest["shards"]) / world_size) * manifest["samples_per_shard"]
    return math.ceil(min(per_rank, manifest["num_samples"]) / batch_size)


def batch_sizes(num_images: int, steps: int) -> list[int]:
    """Split ``num_images`` into ``steps`` batches whose sizes differ by at most one."""
    base, extra = divmod(num_images, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def worker_shards(shard_ids: list[int], num_workers: int) -> list[list[int]]:
    """The shards each loader worker reads, in its reading order: worker w reads
    ``shard_ids[w::W]`` (WebDataset's ``split_by_worker``); no workers reads like one."""
    workers = max(1, num_workers)
    return [shard_ids[w::workers] for w in range(workers)]


def worker_batch_slots(counts: list[int], sizes: list[int], worker: int) -> list[np.ndarray]:
    """Where worker ``worker``'s samples go in the epoch's batches: for each batch, the slots
    (indices within the batch) its next samples fill, in its stream order.

    ``counts`` are the workers' sample counts. The epoch's sample order is the workers'
    streams taken one sample from each in turn, skipping workers that have run out, and cut
    into batches of ``sizes``: worker w's i-th sample is at position ``sum_v min(n_v, i) +
    #{v < w: n_v > i}``. A worker's samples are consecutive in its stream, so each batch takes
    a contiguous run of them.
    """
    n = np.asarray(counts, dtype=np.int64)
    i = np.arange(n[worker], dtype=np.int64)
    position = np.minimum(n[:, None], i[None, :]).sum(axis=0) + (n[:worker, None] > i).sum(axis=0)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    if position.size and position[-1] >= offsets[-1]:
        raise ValueError(f"the batches hold {offsets[-1]} samples, fewer than the workers' streams")
    which = np.searchsorted(offsets, position, side="right") - 1
    bounds = np.searchsorted(which, np.arange(len(sizes) + 1), side="left")
    return [position[bounds[k] : bounds[k + 1]] - offsets[k] for k in range(len(sizes))]


def chunk_need_order(
    manifest: dict, shard_ids: list[int], num_workers: int, rows_per_chunk: int
) -> list[int]:
    """The latent-store chunks of a rank's shards in the order the rank will need them.

    Loader worker w reads shards ``shard_ids[w::W]`` one after the other and its samples are
    taken in turn with the other workers', so the j-th shards of all workers are read at the
    same time: their chunks are interleaved.
    """
    from lcm_dist.latents.layout import chunks_of_rows

    per_worker = worker_shards(shard_ids, num_workers)
    order: list[int] = []
    seen: set[int] = set()
    for j in range(max(len(p) for p in per_worker)):
        lists = []
        for shards in per_worker:
            if j < len(shards):
                entry = manifest["shards"][shards[j]]
                lists.append(
                    list(chunks_of_rows(entry["first_row"], entry["count"], rows_per_chunk))
                )
        for k in range(max(len(chunks) for chunks in lists)):
            for chunks in lists:
                if k < len(chunks) and chunks[k] not in seen:
                    seen.add(chunks[k])
                    order.append(chunks[k])
    return order
