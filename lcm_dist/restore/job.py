"""Fitting at scale: a fresh phi for each of many images (shards or files), on one process or
many, written as it goes and resumable.

The input's rows are cut into fixed *units* of ``batch_size`` consecutive rows (the last may be
shorter); a unit is fitted as one batch, so an image is always fitted with the same batch
whatever the number of processes or where a run was stopped, and its result is the same
(bitwise on a CPU). Process r of P takes the r-th of P contiguous runs of units (so a shard
reader reads each shard once). A unit's results go to the output, then a small marker
``done/unit-NNNNNNNN.json`` commits it; a re-run of the same command skips the committed
units, so after any crash every image ends fitted and committed exactly once.

The output folder (``output.py``) holds the fitted phi, the images and the markers.

Processes share nothing but the output: no collective runs while fitting (one process failing
does not hold the others, and the launcher stops the rest).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from lcm_dist.restore.degrade import (
    Degradation,
    Inpaint,
    finish,
    make_operator,
    random_boxes_mask,
    random_pixels_mask,
)
from lcm_dist.restore.inputs import InputError, row_masks
from lcm_dist.restore.output import FitOutput

TASKS = ("embed", "inpaint", "superres", "colorize")


@dataclass
class FitSettings:
    """What a fit job does; stored in the output, which a re-run must match."""

    task: str
    degraded: bool
    iterations: int
    optimizer: str
    lr: float
    batch_size: int
    seed: int = 0
    factor: int = 4
    box: float | None = None
    mask: str | None = None
    masks: str | None = None
    random_boxes: int = 0
    random_pixels: float = 0.0
    ring_weight: float = 1.0
    ring_width: int = 0
    finish: str = "consistent"  # degrade.finish; as restore.py's default (inpainting: paste)
    init: str = "default"
    image_output: str = "png"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def units(count: int, batch_size: int) -> list[tuple[int, int]]:
    """The units: row ranges [lo, hi) of ``batch_size`` rows, the last possibly shorter."""
    return [(lo, min(lo + batch_size, count)) for lo in range(0, count, batch_size)]


def share(n_units: int, rank: int, world: int) -> range:
    """Process ``rank``'s units: the rank-th of ``world`` contiguous, near-equal runs."""
    return range(rank * n_units // world, (rank + 1) * n_units // world)


def observe(x: torch.Tensor, settings: FitSettings, size: int, rows: range, names: list[str]):
    """(observations, operator) for the clean or degraded inputs ``x`` of ``rows``."""
    task = settings.task
    if task == "embed":
        return x, Degradation()
    random_masks = settings.random_boxes > 0 or settings.random_pixels > 0
    if task == "inpaint" and (settings.masks or random_masks):
        if settings.masks:
            known = row_masks(settings.masks, names, size)
        elif settings.random_boxes:  # seeded per row: the same hole wherever the row lands
            known = torch.cat(
                [
                    random_boxes_mask(1, size, settings.random_boxes, seed=settings.seed + r)
                    for r in rows
                ]
            )
        else:
            known = torch.cat(
                [
                    random_pixels_mask(1, size, settings.random_pixels, seed=settings.seed + r)
                    for r in rows
                ]
            )
        operator = Inpaint(known, ring_weight=settings.ring_weight, ring_width=settings.ring_width)
    else:
        operator = make_operator(
            task,
            size,
            len(rows),
            mask=settings.mask,
            box=settings.box,
            factor=settings.factor,
            ring_weight=settings.ring_weight,
            ring_width=settings.ring_width,
        )
    if settings.degraded:
        y = operator(x) if task == "inpaint" else x  # pixels in the holes carry no information
    else:
        y = operator(x)
    return y, operator


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of two batches in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


def output_names(inputs, count_rows: range) -> list[str]:
    """File-name stems of the rows: ``NNNNNNNNNN`` (the row) for shards, the file name's stem
    for files (``check_names`` refuses two files with one stem)."""
    paths = getattr(inputs, "paths", None)
    if paths is None:
        return [f"{r:010d}" for r in count_rows]
    return [os.path.splitext(os.path.basename(paths[r]))[0] for r in count_rows]


def check_names(inputs) -> None:
    paths = getattr(inputs, "paths", None)
    if paths is None:
        return
    seen: dict[str, str] = {}
    for path, name in zip(paths, output_names(inputs, range(len(paths))), strict=True):
        if name in seen:
            raise InputError(f"inputs {seen[name]} and {path} would both be written as {name}.png")
        seen[name] = path


def fit_unit(model, inputs, settings: FitSettings, lo: int, hi: int) -> tuple[dict, dict]:
    """Fit rows [lo, hi); returns (arrays for the store, {file name: PNG bytes})."""
    from lcm_dist.images import to_png_bytes
    from lcm_dist.restore.fit import fit_phi

    rows = range(lo, hi)
    names = output_names(inputs, rows)
    size = model.image_size
    mode = "L" if settings.task == "colorize" and settings.degraded else "RGB"
    side = size
    if settings.degraded and settings.task == "superres":
        side = size // settings.factor
    x = inputs.read(lo, hi, mode=mode, side=side)
    y, operator = observe(x, settings, size, rows, names)
    start = time.perf_counter()
    images, phi, loss = fit_phi(
        model,
        y,
        operator,
        iterations=settings.iterations,
        optimizer=settings.optimizer,
        lr=settings.lr,
        return_loss=True,
        init=settings.init,
    )
    images = finish(operator, y, images, settings.finish)
    seconds = time.perf_counter() - start
    result = {
        "phi": phi.numpy(),
        "loss": loss.numpy(),
        "psnr": None if settings.degraded else psnr(images, x).numpy(),
        "seconds": round(seconds, 3),
    }
    pngs = [to_png_bytes(image) for image in images]
    if settings.image_output == "shards":
        unit = lo // settings.batch_size
        shard, result["shard"] = unit_shard(unit, lo, [inputs.keys[r] for r in rows], pngs)
        return result, {result["shard"]["name"]: shard}
    return result, {f"{name}.png": png for name, png in zip(names, pngs, strict=True)}


def unit_shard(unit: int, first_row: int, keys: list[str], pngs: list[bytes]) -> tuple[bytes, dict]:
    """Unit ``unit``'s images (rows from ``first_row``) as one shard of the shard-set format
    (``lcm_dist.data.shards``): its bytes and its manifest entry."""
    import hashlib
    import io

    from webdataset import TarWriter

    from lcm_dist.data.shards import add_sample, shard_name

    buffer = io.BytesIO()
    tar = TarWriter(buffer, encoder=False, mtime=0, mode=0o644, user="", group="")
    for row, (key, png) in enumerate(zip(keys, pngs, strict=True), first_row):
        add_sample(tar, row, key, png, "png")
    tar.close()
    data = buffer.getvalue()
    entry = {
        "name": shard_name(unit),
        "first_row": first_row,
        "count": len(pngs),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    return data, entry


def run_fit(
    model,
    inputs,
    output: FitOutput,
    settings: FitSettings,
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    should_stop=lambda: False,
    writer=None,
) -> dict:
    """Fit this process's uncommitted units; returns counts and timings. ``should_stop()`` is
    asked between units (a stop signal: the unit in hand is committed first)."""
    all_units = units(inputs.count, settings.batch_size)
    mine = [u for u in share(len(all_units), rank, world)]
    done = output.committed()
    todo = [u for u in mine if u not in done]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        total = sum(all_units[u][1] - all_units[u][0] for u in mine)
        skipped = total - sum(all_units[u][1] - all_units[u][0] for u in todo)
        bar = tqdm(
            total=total,
            initial=skipped,
            desc=f"fit (process 0 of {world})" if world > 1 else "fit",
            unit="img",
            dynamic_ncols=True,
        )
    fitted = 0
    start = time.perf_counter()
    stopped = False
    try:
        for u in todo:
            if should_stop():
                stopped = True
                break
            lo, hi = all_units[u]
            result, pngs = fit_unit(model, inputs, settings, lo, hi)
            output.write_unit(u, lo, hi, result, pngs)
            fitted += hi - lo
            loss = float(np.mean(result["loss"]))
            if bar is not None:
                bar.update(hi - lo)
                bar.set_postfix(loss=f"{loss:.4f}")
            if writer is not None:
                writer.add_scalar("fit/loss", loss, hi)
                writer.add_scalar("fit/images_per_s", (hi - lo) / max(result["seconds"], 1e-9), hi)
                if result["psnr"] is not None:
                    writer.add_scalar("fit/psnr", float(np.mean(result["psnr"])), hi)
    finally:
        if bar is not None:
            bar.close()  # before an error's line
    return {
        "units": len(mine),
        "skipped_units": len(mine) - len(todo),
        "fitted_images": fitted,
        "seconds": time.perf_counter() - start,
        "stopped": stopped,
    }
