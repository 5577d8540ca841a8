"""Streaming the shards: which rank reads what, in which order, in batches of which size.

The order of an epoch is a pure function of ``(seed, epoch, world_size, rank)`` and the
manifest, so every process can compute any rank's plan without talking to the others:

* the shards are permuted with ``numpy.random.default_rng([seed, epoch])`` and dealt to the
  ranks round-robin: every shard goes to exactly one rank per epoch (so no two ranks ever touch
  the same rows or the same store chunks);
* a rank's shards are split among its loader workers by WebDataset's ``split_by_worker``; the
  epoch's sample order takes one sample from each worker in turn. Each worker assembles its
  share of every batch itself (``lcm_dist.data.plan.worker_batch_slots`` says which slots its
  samples fill) and hands it over in one piece, so a batch costs one hand-over per worker, not
  one per image;
* samples are shuffled in consecutive blocks of ``shuffle_buffer`` samples of each worker's
  stream, seeded by ``(seed, epoch, rank, worker)``: a bounded window, so the rows of a batch
  span a bounded number of latent-store chunks;
* every rank takes the same number of steps per epoch (``steps_per_epoch``), so the ranks cross
  epoch boundaries together; a rank whose shards hold fewer images gets batches that are
  smaller by a few images instead of repeating or dropping any. Each image is seen exactly once
  per epoch.

Every sample's row index is checked against its shard's range in the manifest and every shard's
sample count against the manifest: a missing, extra, undecodable or wrong-size image stops
training with an error naming the shard and the sample, instead of silently shifting rows.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from lcm_dist.data.plan import (
    batch_sizes,
    shards_for_rank,
    steps_per_epoch,
    worker_batch_slots,
    worker_shards,
)
from lcm_dist.data.shards import join, load_manifest
from lcm_dist.lifecycle import loader_worker_init


class ShardDecodeError(ValueError):
    """A shard or a sample in it cannot be read, or does not match the manifest."""


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1]
    rows: torch.Tensor  # (B,) int64 global row indices
    epoch: int
    step_in_epoch: int  # 0-based index of this batch within its epoch
    skipped_rows: torch.Tensor | None = None
    """On the first batch of a resumed epoch: the rows of the batches skipped before it (the
    ones the interrupted run already trained on this epoch), so the latent cache need not read
    their chunks again."""


@dataclass
class _Part:
    """One loader worker's share of one batch, assembled in the worker: its samples' rows and
    images (in its stream order) and the slots they fill in the batch. A worker hands over one
    part per batch, so a batch costs one round trip per worker instead of one per image."""

    index: int  # the batch's index in the epoch
    rows: np.ndarray  # (n,) int64
    images: torch.Tensor | None  # (n, 3, H, W); None in a skipped batch and when n == 0
    slots: np.ndarray  # (n,) int64 positions in the batch

    def pin_memory(self):
        """Called by the DataLoader's pin-memory thread (GPU runs only)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


@dataclass
class _Failure:
    """Sent from a loader worker instead of raising, so the main process can raise a one-line
    error (DataLoader would otherwise wrap it in a multi-line traceback)."""

    message: str


def decode_sample(sample: dict, url: str, image_size: int, image_format: str) -> tuple:
    """(row, image tensor) from a raw WebDataset sample; raises ShardDecodeError naming it."""
    key = sample.get("__key__", "?")
    where = f"sample {key} in shard {url}"
    if image_format not in sample or "json" not in sample:
        raise ShardDecodeError(f"{where} lacks its .{image_format} or .json file")
    try:
        meta = json.loads(sample["json"])
        row = int(meta["row"])
    except (ValueError, KeyError, TypeError) as err:
        raise ShardDecodeError(f"{where} has unreadable metadata: {err}") from None
    try:
        with Image.open(io.BytesIO(sample[image_format])) as im:
            im.load()
            if im.size != (image_size, image_size):
                raise ShardDecodeError(
                    f"{where} is {im.size[0]}x{im.size[1]}, expected {image_size}x{image_size}"
                )
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ShardDecodeError(f"{where} is not a decodable {image_format} image") from None
    except (OSError, SyntaxError) as err:
        raise ShardDecodeError(f"{where} cannot be decoded: {err}") from None
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return row, image


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's samples for one epoch: (row, image) pairs, shuffled in a bounded window."""

    def __init__(
        self,
        base: str,
        manifest: dict,
        shard_ids: list[int],
        *,
        image_size: int,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        rank: int,
        sizes: list[int],
        skip: int = 0,
    ):
        super().__init__()
        self.base = base
        self.entries = [manifest["shards"][i] for i in shard_ids]
        self.image_format = manifest.get("image_format", "png")
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.sizes, self.skip = sizes, skip

    def _samples(self, entries: list[dict]) -> Iterator[tuple]:
        for entry in entries:
            url = join(self.base, entry["name"])
            first, count = entry["first_row"], entry["count"]
            seen = 0
            try:
                dataset = wds.WebDataset(
                    [url],
                    shardshuffle=False,
                    nodesplitter=None,
                    workersplitter=None,
                    empty_check=False,
                    handler=wds.reraise_exception,
                )
                for sample in dataset:
                    row, image = decode_sample(sample, url, self.image_size, self.image_format)
                    if not first <= row < first + count:
                        raise ShardDecodeError(
                            f"sample {sample.get('__key__')} in shard {url} has row {row}, "
                            f"outside the shard's rows {first}..{first + count - 1}"
                        )
                    seen += 1
                    yield row, image
            except ShardDecodeError:
                raise
            except Exception as err:  # tar/stream errors: name the shard and where it broke
                # WebDataset wraps tar errors as (message, stream, url); keep the message only.
                reason = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
                reason = reason.split(" @ <")[0]
                raise ShardDecodeError(
                    f"cannot read shard {url} after {seen} of its {count} samples (rows "
                    f"{first}..{first + count - 1}): {reason}; the file is truncated or damaged "
                    "(python launch/make_shards.py FOLDER --verify checks every shard)"
                ) from None
            if seen != count:
                raise ShardDecodeError(
                    f"shard {url} holds {seen} samples but the manifest says {count} "
                    "(truncated or replaced shard?)"
                )

    def _block_shuffled(self, entries: list[dict], rng: np.random.Generator) -> Iterator[tuple]:
        # Block shuffle: fill a window, emit it in random order, repeat. Unlike a reservoir
        # (random pop), no sample lingers past its window, so a batch's rows come from a bounded
        # run of consecutive rows and the latent cache needs only the chunks of that run.
        block: list[tuple] = []
        for item in self._samples(entries):
            block.append(item)
            if len(block) >= max(1, self.shuffle_buffer):
                yield from _shuffled(block, rng)
                block = []
        yield from _shuffled(block, rng)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # WebDataset's worker splitter reads the worker id from the DataLoader.
        entries = list(wds.split_by_worker(self.entries))
        counts = [sum(e["count"] for e in part) for part in worker_shards(self.entries, workers)]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        samples = self._block_shuffled(entries, rng)
        try:
            for index, slots in enumerate(worker_batch_slots(counts, self.sizes, worker)):
                rows, images = [], []
                for _ in range(slots.size):
                    item = next(samples, None)
                    if item is None:
                        raise ShardDecodeError(
                            f"the shards of rank {self.rank} in epoch {self.epoch} ran out early"
                        )
                    rows.append(item[0])
                    images.append(item[1])
                keep = index >= self.skip and images
                yield _Part(
                    index,
                    np.asarray(rows, dtype=np.int64),
                    torch.stack(images) if keep else None,
                    slots,
                )
            if next(samples, None) is not None:
                raise ShardDecodeError(
                    f"the shards of rank {self.rank} hold more images than planned"
                )
        except ShardDecodeError as err:
            yield _Failure(str(err))


def _shuffled(block: list, rng: np.random.Generator) -> list:
    return [block[i] for i in rng.permutation(len(block))]


class ShardLoader:
    """Endless batches for one rank, epoch after epoch, starting with batch ``start_batch`` of
    epoch ``start_epoch`` (the batches before it are skipped, so a resumed run sees what an
    uninterrupted one would)."""

    def __init__(
        self,
        shards: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        image_size: int | None = None,
        start_epoch: int = 0,
        start_batch: int = 0,
        pin_memory: bool = False,
    ):
        self.base = str(shards)
        self.manifest = load_manifest(self.base)
        self.image_size = image_size or self.manifest["image_size"]
        if self.manifest["image_size"] != self.image_size:
            raise ValueError(
                f"shards in {self.base} hold {self.manifest['image_size']}px images, "
                f"not {self.image_size}px"
            )
        num_shards = len(self.manifest["shards"])
        if num_shards < world_size:
            raise ValueError(
                f"{self.base} has {num_shards} shards, fewer than the {world_size} processes; "
                "remake it with a smaller --samples-per-shard"
            )
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.steps_per_epoch = steps_per_epoch(self.manifest, world_size, batch_size)
        self.start_epoch, self.start_batch = start_epoch, start_batch
        # Batches in page-locked memory, for non-blocking copies to a GPU.
        self.pin_memory = pin_memory

    def plan(self, epoch: int, rank: int | None = None) -> tuple[list[int], list[int]]:
        """(shard ids, batch sizes) of ``rank`` (default: this rank) in ``epoch``."""
        rank = self.rank if rank is None else rank
        ids = shards_for_rank(len(self.manifest["shards"]), self.seed, epoch, rank, self.world_size)
        images = sum(self.manifest["shards"][i]["count"] for i in ids)
        if images < self.steps_per_epoch:
            raise ValueError(
                f"rank {rank} gets only {images} images in epoch {epoch}, fewer than the "
                f"{self.steps_per_epoch} steps per epoch; use more or evenly sized shards"
            )
        return ids, batch_sizes(images, self.steps_per_epoch)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        ids, sizes = self.plan(epoch)
        stream = ShardStream(
            self.base,
            self.manifest,
            ids,
            image_size=self.image_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            sizes=sizes,
            skip=skip,
        )
        parts = iter(
            torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=4 if self.num_workers else None,
                worker_init_fn=loader_worker_init,
                pin_memory=self.pin_memory,
            )
        )
        # Every worker hands over one part per batch, in turn (the DataLoader's round robin).
        workers = max(1, self.num_workers)
        shape = (3, self.image_size, self.image_size)
        skipped: list[np.ndarray] = []
        for index, size in enumerate(sizes):
            got = [self._next_part(parts, epoch) for _ in range(workers)]
            if any(part.index != index for part in got):
                raise ShardDecodeError(f"the loader workers of rank {self.rank} fell out of step")
            got = [part for part in got if part.rows.size]
            if len(got) == 1:  # one worker filled the whole batch, in order
                rows, images = got[0].rows, got[0].images
            else:
                rows = np.empty(size, dtype=np.int64)
                for part in got:
                    rows[part.slots] = part.rows
            if index < skip:
                skipped.append(rows)
                continue
            if len(got) > 1:
                images = torch.empty((size, *shape), pin_memory=self.pin_memory)
                for part in got:
                    images[torch.from_numpy(part.slots)] = part.images
            done = torch.from_numpy(np.concatenate(skipped)) if index == skip and skip else None
            yield Batch(images, torch.from_numpy(rows), epoch, index, done)
        leftover = next(parts, None)
        if isinstance(leftover, _Failure):
            raise ShardDecodeError(leftover.message)
        if leftover is not None:
            raise ShardDecodeError(f"the shards of rank {self.rank} hold more images than planned")

    def _next_part(self, parts, epoch: int) -> _Part:
        part = next(parts, None)
        if isinstance(part, _Failure):
            raise ShardDecodeError(part.message)
        if part is None:
            raise ShardDecodeError(f"the shards of rank {self.rank} in epoch {epoch} ran out early")
        return part

    def __iter__(self) -> Iterator[Batch]:
        epoch, skip = self.start_epoch, self.start_batch
        while True:
            yield from self.epoch_batches(epoch, skip)
            epoch, skip = epoch + 1, 0
