"""Export a run's newest commit as a self-contained model for restoration.

An export is a Zarr v3 group on any fsspec URL that plain ``zarr`` and ``safetensors`` read
without lcm-dist:

    <out>/zarr.json              group attributes: format, version, model config, phi layout,
                                 loss settings, step, number of images, complete flag
    <out>/latents                (N, P) float32: row i is the phi of training image i
    <out>/keys                   (N,) strings: the key (source) of image i
    <out>/noise                  (1, C, S, S) float32: the fixed noise input s
    <out>/initial_phi            (P,) float32: the phi every image started from
    <out>/generator.safetensors  the generator's fp32 weights (names as in Generator)

The group is created with ``complete: false`` and its attributes are rewritten with
``complete: true`` only after every array and the generator file are written, so a reader
can tell an interrupted export from a finished one.

Every write of an export, and every read of the run's store, retries transient storage errors
with the run's ``store.retries`` / ``store.retry_seconds`` (``lcm_dist.latents.retry``); each
write replaces a whole object with the same content, so repeating it is safe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lcm_dist import commits
from lcm_dist.config import config_from_dict, model_from_dict
from lcm_dist.data.shards import load_keys
from lcm_dist.latents.retry import StoreIOError, plain_reason, store_options
from lcm_dist.latents.run_store import resolve_url, retry_policy
from lcm_dist.latents.store import LatentStore
from lcm_dist.latents.zarr_groups import open_checked_group
from lcm_dist.model.latent_net import initial_phi, make_noise, phi_layout

FORMAT = "lcm-dist-export"
VERSION = 1
GENERATOR_FILE = "generator.safetensors"
ROWS_PER_CHUNK = 256
"""Rows per chunk of the exported ``latents`` (about 25 MB at the paper's P)."""


class ExportError(ValueError):
    """An export cannot be written or read."""


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _run_config(run_dir: Path):
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{run_dir} is not a run directory: {path} does not exist") from None
    return config_from_dict(raw, str(path))


def _training_dir(run: Path, configured: str) -> Path | None:
    """The directory training ran from, when the run's configured ``run_dir`` is a relative
    path that ``run`` (as found now) ends with; relative paths in the run's config and state
    are relative to it."""
    if not configured or "://" in configured or Path(configured).is_absolute():
        return None
    tail = Path(os.path.normpath(configured)).parts
    parts = run.resolve().parts
    if tail and parts[-len(tail) :] == tail:
        return Path(*parts[: -len(tail)])
    return None


def _locate(path: str, base: Path | None) -> str:
    """A path from the run's config or state, as seen from the current directory: a relative
    local path is taken relative to the directory training ran from (``base``)."""
    if base is None or not path or "://" in path or Path(path).is_absolute():
        return path
    return str(base / path)


def open_trained_run(run: Path, shards: str | None = None, what: str = "export"):
    """A trained run's newest commit, seen from the current directory: ``(config, commit,
    latent store at the commit's slots (read-only), keys of its rows)``. ``shards`` overrides
    where the run's ``keys.txt`` is read from; ``what`` names the command in errors."""
    cfg = _run_config(run)
    commit = commits.find_latest(run)
    if commit is None:
        raise ExportError(f"the run in {run} has no committed checkpoint to {what} yet")
    state = commit.state
    if state.get("store_url") is None or commit.slots is None:
        raise ExportError(
            f"the run in {run} kept its latents in RAM (store.in_ram), so there are none to {what}"
        )
    num_images = int(state["num_images"])
    # Relative paths in the run are relative to where training ran, not to where this runs.
    base = _training_dir(run, cfg.run_dir)
    given = shards is not None
    shards = shards or _locate(cfg.data.shards, base)
    try:
        keys = load_keys(shards)
    except FileNotFoundError:
        hint = (
            "--shards must name the folder of the run's shards"
            if given
            else "if its shards moved, pass their folder with --shards"
        )
        raise ExportError(f"the run's image keys ({shards}/keys.txt) are missing; {hint}") from None
    if len(keys) != num_images:
        raise ExportError(
            f"{shards} lists {len(keys)} keys but the run trained on "
            f"{num_images} images; pass the run's own shards folder with --shards"
        )
    # The default store (empty store.url) lives inside the run folder, wherever it is now.
    store_url = (
        resolve_url(cfg.model_copy(update={"run_dir": str(run)}))
        if not cfg.store.url
        else _locate(state["store_url"], base)
    )
    store = LatentStore.open(
        store_url, storage_options=cfg.store.storage_options, mode="r", retry=retry_policy(cfg)
    )
    store.restore_slots(commit.slots)
    return cfg, commit, store, keys


def export_run(
    run_dir: str | os.PathLike,
    out_url: str,
    *,
    storage_options: dict | None = None,
    shards: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the newest commit of the run in ``run_dir`` to ``out_url``; returns the group's
    attributes. ``shards`` overrides where the run's ``keys.txt`` is read from."""
    import fsspec
    import zarr

    run = Path(run_dir)
    cfg, commit, store, keys = open_trained_run(run, shards, "export")
    state = commit.state
    model = model_from_dict(state["model"], f"{commit.folder / 'state.json'}")
    num_images = int(state["num_images"])
    retry = retry_policy(cfg)

    def write(op, what: str):
        """``op()``, retried on transient errors; ``what`` names it in errors."""
        return retry.call(op, f"writing {what} of the export", out_url)

    options = store_options(out_url, storage_options)
    modes = iter(["w" if overwrite else "w-"])  # a retry reopens what the first attempt made
    try:
        group = retry.opening().call(
            lambda: zarr.open_group(out_url, mode=next(modes, "a"), storage_options=options),
            "creating the export",
            out_url,
        )
    except FileExistsError:
        raise ExportError(f"{out_url} already exists; pass --overwrite to replace it") from None
    except StoreIOError:
        raise
    except Exception as err:
        raise ExportError(f"cannot create the export at {out_url}: {plain_reason(err)}") from None

    layout = phi_layout(model)
    attrs = {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "step": int(state["step"]),
        "checkpoint": commit.tag,
        "num_images": num_images,
        "phi_size": layout.size,
        "image_size": model.image_size,
        "image_channels": model.image_channels,
        "model": state["model"],
        "loss": state.get("loss", {}),
        "phi_layout": [
            {"name": s.name, "shape": list(s.shape), "offset": s.offset, "clamped": s.clamped}
            for s in layout.slices
        ],
        "generator": GENERATOR_FILE,
        "arrays": {
            "latents": "(num_images, phi_size) float32; row i is the phi of image i",
            "keys": "(num_images,) string; the key (source) of image i",
            "noise": "(1, noise_channels, noise_size, noise_size) float32; the noise input s",
            "initial_phi": "(phi_size,) float32; the phi every image started from",
        },
    }
    write(lambda: group.attrs.put(attrs), "the attributes")
    noise, initial = make_noise(model).numpy(), initial_phi(model).numpy()
    write(lambda: group.create_array("noise", data=noise, overwrite=True), "noise")
    write(lambda: group.create_array("initial_phi", data=initial, overwrite=True), "initial_phi")
    key_array = write(
        lambda: group.create_array(
            "keys",
            shape=(num_images,),
            chunks=(min(num_images, 1 << 16),),
            dtype=str,
            overwrite=True,
        ),
        "keys",
    )
    key_values = np.asarray(keys, dtype=object)
    write(lambda: key_array.__setitem__(slice(None), key_values), "keys")
    latents = write(
        lambda: group.create_array(
            "latents",
            shape=(num_images, layout.size),
            chunks=(min(num_images, ROWS_PER_CHUNK), layout.size),
            dtype="float32",
            fill_value=float("nan"),  # a chunk lost in a copy reads as NaN, not a valid phi
            overwrite=True,
        ),
        "latents",
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_images, desc="latents", unit="img", dynamic_ncols=True)
    # Copy in runs of whole store chunks of about ROWS_PER_CHUNK rows.
    step = max(1, ROWS_PER_CHUNK // store.rows_per_chunk) * store.rows_per_chunk
    for start in range(0, num_images, step):
        stop = min(start + step, num_images)
        first, last = start // store.rows_per_chunk, -(-stop // store.rows_per_chunk)
        block = np.concatenate([store.read_chunk(c) for c in range(first, last)])
        rows = block[: stop - start]
        write(
            lambda start=start, stop=stop, rows=rows: latents.__setitem__(slice(start, stop), rows),
            f"rows {start}-{stop - 1} of latents",
        )
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    # A run still training may have committed since: after a new commit it writes into the
    # slots this export read (shadow paging alternates them), so the rows may be a mix.
    latest = commits.committed_tag(run)
    if latest != commit.tag:
        raise ExportError(
            f"the run in {run} committed {latest or 'nothing'} while this "
            f"export copied the latents of {commit.tag}, and may have rewritten some of them; "
            "export again after it stops (or right after a checkpoint)"
        )

    weights = (commit.folder / GENERATOR_FILE).read_bytes()

    def write_generator():
        with fsspec.open(_join(out_url, GENERATOR_FILE), "wb", **(options or {})) as out:
            out.write(weights)

    write(write_generator, GENERATOR_FILE)
    attrs["complete"] = True
    write(lambda: group.attrs.put(attrs), "the attributes")
    return attrs


def open_export(url: str, storage_options: dict | None = None):
    """Open an export for reading; returns ``(group, attrs)`` after checking that it is a
    complete export of a version this lcm-dist reads."""
    try:
        group, attrs = open_checked_group(url, "r", storage_options, "export", FORMAT, VERSION)
    except ValueError as err:
        if "://" not in url and (Path(url) / "config.json").is_file():
            raise ExportError(
                f"{url} is a training run, not an export; make one with "
                f"python launch/export.py --run {url} --out EXPORT"
            ) from None
        raise ExportError(str(err)) from None
    if not attrs.get("complete"):
        raise ExportError(f"export {url} is incomplete (its writing was interrupted); export again")
    return group, attrs
