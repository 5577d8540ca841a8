"""The latent store a run's config describes: its URL, retry policy and chunking, opened (or
created) and checked against the config and the shards' manifest."""

from __future__ import annotations

import os

import numpy as np

from lcm_dist.latents.format import model_signature
from lcm_dist.latents.layout import (
    MAX_AUTO_CHUNK_BYTES,
    MAX_AUTO_OBJECT_CHUNK_BYTES,
    auto_rows_per_chunk,
    is_object_store,
)
from lcm_dist.latents.retry import RetryPolicy
from lcm_dist.latents.store import LatentStore


def resolve_url(cfg) -> str:
    """The run's store URL (``store.url``, or ``<run_dir>/latents.zarr``)."""
    return cfg.store.url or os.path.join(cfg.run_dir, "latents.zarr")


def retry_policy(cfg) -> RetryPolicy:
    """The run's retry policy for store operations (``store.retries``, ``store.retry_seconds``)."""
    return RetryPolicy(retries=cfg.store.retries, seconds=cfg.store.retry_seconds)


def rows_per_chunk_for(cfg, samples_per_shard: int) -> int:
    """``store.rows_per_chunk``, or the automatic choice (chunks up to 8 MB on a filesystem,
    16 MB on object storage); checked to divide the shard size, so that a shard maps to whole
    chunks and no two processes ever write the same chunk."""
    from lcm_dist.model.latent_net import phi_layout

    row_bytes = phi_layout(cfg.model).size * np.dtype(cfg.store.dtype).itemsize
    largest = (
        MAX_AUTO_OBJECT_CHUNK_BYTES if is_object_store(resolve_url(cfg)) else MAX_AUTO_CHUNK_BYTES
    )
    rows = cfg.store.rows_per_chunk or auto_rows_per_chunk(samples_per_shard, row_bytes, largest)
    if samples_per_shard % rows:
        raise ValueError(
            f"store.rows_per_chunk ({rows}) must divide the shards' samples_per_shard "
            f"({samples_per_shard}) so that each shard maps to whole chunks; set it to a divisor "
            "or 0 (automatic)"
        )
    return rows


def store_codec(store: LatentStore) -> str:
    """The compression of a store's chunks: none, zstd or blosc."""
    names = {type(c).__name__ for c in store._data[0].compressors}
    return "zstd" if "ZstdCodec" in names else "blosc" if "BloscCodec" in names else "none"


def _check_store_settings(cfg, store: LatentStore) -> None:
    """A store keeps the dtype, codec and chunking it was made with: a config that asks for
    others (e.g. on resume) is an error, not silently ignored."""
    st = cfg.store
    have = {"dtype": str(store.dtype), "codec": store_codec(store)}
    want = {"dtype": st.dtype, "codec": st.codec}
    if st.rows_per_chunk:
        have["rows_per_chunk"], want["rows_per_chunk"] = store.rows_per_chunk, st.rows_per_chunk
    diff = [
        f"store.{k}: store {have[k]!r} vs config {want[k]!r}" for k in want if have[k] != want[k]
    ]
    if diff:
        raise ValueError(
            f"latent store {store.url} was made with other settings ({', '.join(diff)}); a store "
            "keeps the settings it was made with: set them back, or use a new store.url"
        )


def open_run_store(cfg, manifest: dict, create: bool) -> LatentStore:
    """Open the run's store, creating it first if ``create`` and it does not exist yet.

    An existing store must match the model and hold at least the dataset's rows, and its chunk
    size must divide the shard size (it is checked before anything is written)."""
    from lcm_dist.model.latent_net import initial_phi

    url = resolve_url(cfg)
    options = cfg.store.storage_options
    signature = model_signature(cfg.model)
    sps = manifest["samples_per_shard"]
    faults = {"retry": retry_policy(cfg), "stall_warning_seconds": cfg.store.stall_warning_seconds}
    if create and not LatentStore.exists(url, options, faults["retry"]):
        store = LatentStore.create(
            url,
            num_rows=manifest["num_samples"],
            initial=initial_phi(cfg.model).numpy(),
            signature=signature,
            rows_per_chunk=rows_per_chunk_for(cfg, sps),
            codec=cfg.store.codec,
            codec_level=cfg.store.codec_level,
            dtype=cfg.store.dtype,
            storage_options=options,
            **faults,
        )
    else:
        store = LatentStore.open(
            url,
            signature=signature,
            min_rows=manifest["num_samples"],
            storage_options=options,
            **faults,
        )
        _check_store_settings(cfg, store)
    if sps % store.rows_per_chunk:
        raise ValueError(
            f"latent store {url} has {store.rows_per_chunk} rows per chunk, which does not "
            f"divide the shards' samples_per_shard ({sps}); remake the shards or the store"
        )
    return store
