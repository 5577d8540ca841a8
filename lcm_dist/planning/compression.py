"""How small the configured codec makes phi rows: rows to sample (the run's store if it exists,
else the initial phi plus noise) and their compression ratio through the run's own codec path."""

from __future__ import annotations

import numpy as np

from lcm_dist.config import RunConfig


def sample_rows(cfg: RunConfig, count: int) -> tuple[np.ndarray, str]:
    """Up to ``count`` rows to measure compression on, and where they came from: the run's
    store if it has committed chunks, else synthetic rows shaped like trained ones."""
    import torch

    from lcm_dist.latents.retry import StoreIOError
    from lcm_dist.latents.run_store import resolve_url, retry_policy
    from lcm_dist.latents.store import LatentStore
    from lcm_dist.model.latent_net import initial_phi, phi_layout

    url = resolve_url(cfg)
    unread = ""
    if not cfg.store.in_ram:
        options, retry = cfg.store.storage_options, retry_policy(cfg)
        try:
            if LatentStore.exists(url, options, retry):
                store = LatentStore.open(url, storage_options=options, mode="r", retry=retry)
                parts, have = [], 0
                for chunk in np.nonzero(store.committed >= 0)[0].tolist():
                    if have >= count:
                        break
                    parts.append(store.read_chunk(chunk)[: count - have])
                    have += parts[-1].shape[0]
                if parts:
                    data = np.concatenate(parts)
                    return data, f"{have} committed rows of the run's store {url}"
        except (ValueError, OSError, StoreIOError) as err:
            unread = f"; the run's store could not be read: {err}"
    # Trained rows (a demo64 run, 16 updates per image) have their conv weights spread over
    # [-clamp, clamp] (std ~0.84 clamp, a tenth exactly at a bound) and their normalisation
    # parameters within ~0.5% of the initial ones.
    initial = initial_phi(cfg.model)
    gen = torch.Generator().manual_seed(0)
    rows = initial * (1 + 0.005 * torch.randn(count, initial.numel(), generator=gen))
    mask = phi_layout(cfg.model).clamp_mask()
    conv = (torch.rand(count, int(mask.sum()), generator=gen) * 2.2 - 1.1) * cfg.model.clamp
    rows[:, mask] = conv.clamp(-cfg.model.clamp, cfg.model.clamp)
    return rows.numpy(), (
        f"{count} synthetic rows: conv weights uniform over +-1.1 model.clamp, clamped, and "
        f"the initial normalisation parameters within 0.5%{unread}"
    )


def compression_ratio(cfg: RunConfig, rows: np.ndarray) -> float:
    """Logical / stored bytes of ``rows`` written as one chunk of a store with the configured
    codec, level and dtype (an in-memory Zarr store, so the codec path is the run's own)."""
    import uuid

    import fsspec

    from lcm_dist.latents.store import LatentStore

    url = f"memory://lcm-plan-{uuid.uuid4().hex}/latents.zarr"
    store = LatentStore.create(
        url,
        num_rows=rows.shape[0],
        initial=rows[0],
        signature={"phi_size": rows.shape[1]},
        rows_per_chunk=rows.shape[0],
        codec=cfg.store.codec,
        codec_level=cfg.store.codec_level,
        dtype=cfg.store.dtype,
    )
    store.write_chunk(0, rows)
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    stored = sum(fs.size(p) for p in fs.find(root) if "/slot" in p and "/c/" in p)
    fs.rm(root.removesuffix("/latents.zarr"), recursive=True)
    return store.chunk_nbytes(0) / stored
