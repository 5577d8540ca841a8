"""A batch's latent rows, step by step: the next batch and its phi read from the latent table,
the epoch boundary (write back, then share where every process wrote), and the host-to-device
hand-over.

The work that can fail on one process alone (the loader, the store) runs in
``distributed.together`` agreements in ``Trainer.step``; the one collective here,
``share_latent_slots``, runs between them, never inside one: a process that failed would
otherwise join the agreement's collective while the others sit in this one (a hang under
NCCL, an unrelated error under gloo).
"""

from __future__ import annotations

import time

import torch

from lcm_dist import distributed
from lcm_dist.data.plan import chunk_need_order
from lcm_dist.faults import fail_point
from lcm_dist.latents.cache import StoreIOError
from lcm_dist.latents.retry import plain_reason
from lcm_dist.latents.table import InMemoryLatentTable


def next_batch(batches, latents, epoch: int | None):
    """The next batch; when it opens a new epoch, the last epoch's latents are written back
    first. Returns (batch, io stats of the epoch that ended or None, seconds spent waiting for
    the loader). No collective: run it in an agreement."""
    start = time.perf_counter()
    batch = next(batches)
    waited = time.perf_counter() - start
    ended = None
    if batch.epoch != epoch and epoch is not None:
        try:
            fail_point("latents.end_epoch")
            latents.end_epoch()
        except OSError as err:
            raise StoreIOError(
                f"writing back the latents of epoch {epoch} failed ({plain_reason(err)}); the "
                "last checkpoint resumes"
            ) from None
        ended = latents.stats()
    return batch, ended, waited


def batch_latents(latents, loader, cfg, batch, new_epoch: bool):
    """The batch's phi rows (host memory), after starting the cache's new epoch if it opens
    one. No collective: run it in an agreement."""
    if new_epoch:
        latents.begin_epoch(_chunk_order(cfg, loader, latents, batch.epoch), batch.skipped_rows)
    return latents.read_rows(batch.rows)


def _chunk_order(cfg, loader, latents, epoch: int) -> list[int]:
    if isinstance(latents, InMemoryLatentTable):
        return []
    shard_ids, _ = loader.plan(epoch)
    return chunk_need_order(
        loader.manifest, shard_ids, cfg.data.num_workers, latents.rows_per_chunk
    )


def share_latent_slots(latents) -> None:
    """Tell every process where the others wrote their chunks. Every process has finished its
    writes before this (flush) and the exchange is a collective, so the next reads see every
    chunk's newest data. Nothing is committed here: only a checkpoint commits."""
    changes = latents.changes()
    if distributed.world_size() > 1:
        # Each chunk was written by at most one process: -2 marks "not mine", MAX merges.
        table = torch.full((latents.store.num_chunks,), -2, dtype=torch.int32)
        for chunk, slot in changes.items():
            table[chunk] = slot
        table = distributed.max_over_ranks(table)
        changes = {int(c): int(table[c]) for c in torch.nonzero(table > -2).flatten()}
    latents.apply_changes(changes)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host: a non-blocking copy from page-locked memory
    on a GPU (a tensor not page-locked is staged through PyTorch's pinned host cache, which
    keeps the buffer until the copy ends).
    On a CPU the tensor itself."""
    if device.type != "cuda":
        return t
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
