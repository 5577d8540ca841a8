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

import functools
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
    pixels: torch.Tensor  # (B, H, W, 3) uint8, as decoded; in page-locked memory on GPU runs
    rows: torch.Tensor  # (B,) int64 global row indices
    epoch: int
    step_in_epoch: int  # 0-based index of this batch within its epoch
    skipped_rows: torch.Tensor | None = None
    """On the first batch of a resumed epoch: the rows of the batches skipped before it (the
    ones the interrupted run already trained on this epoch), so the latent cache need not read
    their chunks again."""

    @property
    def images(self) -> torch.Tensor:
        """(B, 3, H, W) float32 in [0, 1], on the host (``images_on`` puts them on a device)."""
        return images_on(self.pixels, torch.device("cpu"))


@functools.cache
def _unit_values(device: torch.device) -> torch.Tensor:
    """The 256 float32 values v / 255 (divided on the host), on ``device``, copied there once."""
    return (torch.arange(256, dtype=torch.float32) / 255.0).to(device)


def images_on(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 pixels -> (B, 3, H, W) float32 in [0, 1] on ``device``. To a GPU the
    uint8 pixels go (a quarter of float32's bytes, without blocking the host when they are
    pinned) and are converted there. The conversion looks each value up in a table of v / 255,
    so it gives the same bits on every device: a GPU divides by a scalar as a multiplication
    by its reciprocal, which differs from the CPU's division in the last bit for some values."""
    if device.type != "cpu":
        pixels = pixels.to(device, non_blocking=pixels.is_pinned())
    values = _unit_values(pixels.device)[pixels.long()]
    return values.permute(0, 3, 1, 2).contiguous()


@dataclass
class _Part:
    """One loader worker's share of one batch, assembled in the worker: its samples' rows and
    images (in its stream order) and the slots they fill in the batch. A worker hands over one
    part per batch, so a batch costs one round trip per worker instead of one per image. The
    images cross as a NumPy uint8 array, pickled through the DataLoader's pipe: a quarter of
    float32's bytes, and no shared-memory segment and file descriptor to pass per tensor,
    which cost about 0.7 ms per batch; they are converted to float where the batch is used
    (``images_on``), on the GPU in a GPU run."""

    epoch: int
    index: int  # the batch's index in the epoch
    rows: np.ndarray  # (n,) int64
    images: np.ndarray | None  # (n, H, W, 3) uint8; None in a skipped batch and when n == 0
    slots: np.ndarray  # (n,) int64 positions in the batch


@dataclass
class _Failure:
    """Sent from a loader worker instead of raising, so the main process can raise a one-line
    error (DataLoader would otherwise wrap it in a multi-line traceback)."""

    message: str


def decode_sample(sample: dict, url: str, image_size: int, image_format: str) -> tuple:
    """(row, (H, W, 3) uint8 array) from a raw WebDataset sample; raises ShardDecodeError
    naming it."""
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
    return row, array


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's samples, epoch after epoch from ``first_epoch`` (``epochs`` of them, or
    without end): each loader worker's share of every batch, its samples shuffled in a bounded
    window. The first ``skip`` batches of the first epoch are read but not decoded into
    batches (their rows are still handed over, for the latent cache). One stream serves a whole
    run, so the loader's worker processes are started once, not every epoch, and read on into
    the next epoch while the last batches of this one train."""

    def __init__(self, loader: ShardLoader, first_epoch: int, skip: int, epochs: int | None):
        super().__init__()
        self.loader = loader
        self.first_epoch, self.skip, self.epochs = first_epoch, skip, epochs

    def _samples(self, entries: list[dict]) -> Iterator[tuple]:
        base, size, image_format = self.loader.base, self.loader.image_size, self.loader.format
        for entry in entries:
            url = join(base, entry["name"])
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
                    row, image = decode_sample(sample, url, size, image_format)
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
        window = max(1, self.loader.shuffle_buffer)
        for item in self._samples(entries):
            block.append(item)
            if len(block) >= window:
                yield from _shuffled(block, rng)
                block = []
        yield from _shuffled(block, rng)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = self.first_epoch, self.skip
        try:
            while self.epochs is None or epoch < self.first_epoch + self.epochs:
                yield from self._epoch(epoch, skip, worker, workers)
                epoch, skip = epoch + 1, 0
        except (ShardDecodeError, ValueError) as err:
            yield _Failure(str(err))

    def _epoch(self, epoch: int, skip: int, worker: int, workers: int) -> Iterator[_Part]:
        loader, rank = self.loader, self.loader.rank
        ids, sizes = loader.plan(epoch)
        shards = [loader.manifest["shards"][i] for i in ids]
        # WebDataset's worker splitter reads the worker id from the DataLoader.
        entries = list(wds.split_by_worker(shards))
        counts = [sum(e["count"] for e in part) for part in worker_shards(shards, workers)]
        rng = np.random.default_rng([loader.seed, epoch, rank, worker])
        samples = self._block_shuffled(entries, rng)
        for index, slots in enumerate(worker_batch_slots(counts, sizes, worker)):
            rows, images = [], []
            for _ in range(slots.size):
                item = next(samples, None)
                if item is None:
                    raise ShardDecodeError(
                        f"the shards of rank {rank} in epoch {epoch} ran out early"
                    )
                rows.append(item[0])
                images.append(item[1])
            keep = index >= skip and images
            yield _Part(
                epoch,
                index,
                np.asarray(rows, dtype=np.int64),
                np.stack(images) if keep else None,
                slots,
            )
        if next(samples, None) is not None:
            raise ShardDecodeError(
                f"the shards of rank {rank} in epoch {epoch} hold more images than planned"
            )


def _shut_down(parts) -> None:
    """Stop a DataLoader iterator's worker processes now. Left to garbage collection they live
    as long as anything references the iterator, such as the traceback of an error raised
    while reading from it, and they ignore SIGTERM (``lifecycle.loader_worker_init``), so a
    process whose error escaped would wait for them at exit for ever."""
    shut_down = getattr(parts, "_shutdown_workers", None)  # absent without workers
    if shut_down is not None:
        shut_down()


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
        self.format = self.manifest.get("image_format", "png")
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
        """The batches of one epoch, from batch ``skip`` on."""
        parts = self._parts(epoch, skip, epochs=1)
        try:
            yield from self._batches(parts, epoch, skip)
            leftover = next(parts, None)
            if isinstance(leftover, _Failure):
                raise ShardDecodeError(leftover.message)
            if leftover is not None:
                raise ShardDecodeError(
                    f"the shards of rank {self.rank} hold more images than planned"
                )
        finally:
            _shut_down(parts)

    def __iter__(self) -> Iterator[Batch]:
        """Batches without end, from the start position on, through one stream (one set of
        worker processes) for the whole run."""
        epoch, skip = self.start_epoch, self.start_batch
        parts = self._parts(epoch, skip, epochs=None)
        try:
            while True:
                yield from self._batches(parts, epoch, skip)
                epoch, skip = epoch + 1, 0
        finally:
            _shut_down(parts)

    def _parts(self, epoch: int, skip: int, epochs: int | None) -> Iterator:
        return iter(
            torch.utils.data.DataLoader(
                ShardStream(self, epoch, skip, epochs),
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=4 if self.num_workers else None,
                worker_init_fn=loader_worker_init,
            )
        )

    def _batches(self, parts: Iterator, epoch: int, skip: int) -> Iterator[Batch]:
        """Assemble one epoch's batches from the workers' parts."""
        _, sizes = self.plan(epoch)
        # Every worker hands over one part per batch, in turn (the DataLoader's round robin).
        workers = max(1, self.num_workers)
        side = self.image_size
        skipped: list[np.ndarray] = []
        for index, size in enumerate(sizes):
            got = [self._next_part(parts, epoch) for _ in range(workers)]
            if any((part.epoch, part.index) != (epoch, index) for part in got):
                raise ShardDecodeError(f"the loader workers of rank {self.rank} fell out of step")
            got = [part for part in got if part.rows.size]
            if len(got) == 1:  # one worker filled the whole batch, in order
                rows = got[0].rows
            else:
                rows = np.empty(size, dtype=np.int64)
                for part in got:
                    rows[part.slots] = part.rows
            if index < skip:
                skipped.append(rows)
                continue
            if len(got) == 1 and not self.pin_memory:
                pixels = torch.from_numpy(got[0].images)
            else:  # page-locked on GPU runs, for a non-blocking copy to the device
                pixels = torch.empty(
                    (size, side, side, 3), dtype=torch.uint8, pin_memory=self.pin_memory
                )
                for part in got:
                    pixels[torch.from_numpy(part.slots)] = torch.from_numpy(part.images)
            done = torch.from_numpy(np.concatenate(skipped)) if index == skip and skip else None
            yield Batch(pixels, torch.from_numpy(rows), epoch, index, done)

    def _next_part(self, parts, epoch: int) -> _Part:
        part = next(parts, None)
        if isinstance(part, _Failure):
            raise ShardDecodeError(part.message)
        if part is None:
            raise ShardDecodeError(f"the shards of rank {self.rank} in epoch {epoch} ran out early")
        return part
