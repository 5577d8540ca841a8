"""Growing a trained run onto a larger shard set (``train.grow_from``).

A new ``run_dir`` whose config names a trained run in ``train.grow_from`` starts, on its first
launch, from that run's newest commit: the generator's weights, the optimizer state, the
BatchNorm statistics and the step carry over unchanged, and so does the phi of every image the
run trained on. The new shards must begin with those images, in the same order (their keys
are compared), so that old row i stays row i; the rows after them are the new images, which
start from their fitted phi in a ``launch/fit.py`` output (``train.new_rows_from``, matched by
key) or from the default init. The new run gets its own latent store and a first commit that
is a copy of the old one with the new store's slot table; from there it trains (and resumes)
as any run does, from the next step, at the start of an epoch over the grown set. The old run
is only read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lcm_dist.config import RunConfig, config_to_dict
from lcm_dist.train import checkpoint


class GrowError(ValueError):
    """A run cannot be grown as the config asks."""


class _FittedRows:
    """The new rows' fitted phi in a ``launch/fit.py`` output, read a store chunk at a time
    (a million new rows do not fit in memory at once)."""

    def __init__(self, where: str, latents, rows: list[int], keys: list[str]):
        self.where, self.latents, self.rows, self.keys = where, latents, rows, keys

    def take(self, lo: int, hi: int) -> np.ndarray:
        """Phi (hi - lo, P) of new rows [lo, hi) (counted from the first new row)."""
        phi = np.asarray(self.latents.oindex[np.asarray(self.rows[lo:hi]), :], dtype=np.float32)
        bad = np.nonzero(~np.isfinite(phi).all(1))[0]
        if bad.size:
            raise GrowError(
                f"the fit in {self.where} has not committed the image "
                f"{self.keys[lo + int(bad[0])]!r}; re-run the fit to finish it"
            )
        return phi


def _new_rows(cfg: RunConfig, keys: list[str], phi_size: int) -> _FittedRows | None:
    """The new rows' phi from ``train.new_rows_from`` (by key), or None."""
    if not cfg.train.new_rows_from:
        return None
    from lcm_dist.latents.zarr_groups import open_checked_group
    from lcm_dist.restore.output import FORMAT, VERSION

    url = cfg.train.new_rows_from.rstrip("/") + "/latents.zarr"
    group, attrs = open_checked_group(url, "r", None, "fit output", FORMAT, VERSION)
    if attrs.get("phi_size") != phi_size:
        raise GrowError(
            f"the fit in {cfg.train.new_rows_from} has phi of {attrs.get('phi_size')} floats; "
            f"the run's model has {phi_size}"
        )
    fitted = {str(k): i for i, k in enumerate(group["keys"][:])}
    missing = [k for k in keys if k not in fitted]
    if missing:
        raise GrowError(
            f"the fit in {cfg.train.new_rows_from} has no phi for the new image {missing[0]!r} "
            f"({len(missing)} of {len(keys)} new images missing); fit the new shards"
        )
    return _FittedRows(cfg.train.new_rows_from, group["latents"], [fitted[k] for k in keys], keys)


def grow_run(cfg: RunConfig, manifest: dict, progress: bool = True) -> str:
    """Give the new run ``cfg.run_dir`` (no commit yet) its first commit, grown from
    ``cfg.train.grow_from``; returns the commit's tag. One process (rank 0) runs this."""
    from lcm_dist.data.shards import load_keys
    from lcm_dist.export import ExportError, open_trained_run
    from lcm_dist.latents.run_store import open_run_store, resolve_url
    from lcm_dist.model.latent_net import initial_phi

    old_dir = Path(cfg.train.grow_from)
    if old_dir.resolve() == Path(cfg.run_dir).resolve():
        raise GrowError("train.grow_from names the run itself; a grown run needs a new run_dir")
    try:
        old_cfg, commit, old_store, old_keys = open_trained_run(old_dir, what="grow")
    except ExportError as err:
        raise GrowError(f"train.grow_from: {err}") from None
    ours, theirs = config_to_dict(cfg)["model"], commit.state["model"]
    if ours != theirs:
        key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
        raise GrowError(
            f"the config's model differs from that of {old_dir} (model.{key}: "
            f"{theirs.get(key)!r} there, {ours.get(key)!r} here); a grown run keeps its model"
        )
    keys = load_keys(cfg.data.shards)
    n_old, n_new = len(old_keys), len(keys)
    if n_new <= n_old:
        raise GrowError(
            f"the shards in {cfg.data.shards} hold {n_new} images, not more than the "
            f"{n_old} that {old_dir} trained on; growing needs new images after the old ones"
        )
    for row, (a, b) in enumerate(zip(old_keys, keys, strict=False)):
        if a != b:
            raise GrowError(
                f"row {row} of {cfg.data.shards} is {b!r} but {old_dir} trained {a!r} there; "
                "the new shards must start with the old images in their order (make_shards.py "
                "with the old sources first)"
            )
    new_url = resolve_url(cfg)
    if new_url == old_store.url:
        raise GrowError(f"the grown run needs its own latent store; {new_url} is {old_dir}'s")
    fitted = _new_rows(cfg, keys[n_old:], old_store.phi_size)
    store = open_run_store(cfg, manifest, create=True)
    if (store.committed >= 0).any():
        raise GrowError(
            f"the latent store {new_url} holds latents committed by another run; point "
            "store.url elsewhere or delete it"
        )
    init = initial_phi(cfg.model).numpy()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_new, desc="grow", unit="img", dynamic_ncols=True)
    for chunk in range(store.num_chunks):
        lo, hi = store.chunk_bounds(chunk)
        data = np.empty((hi - lo, store.phi_size), dtype=np.float32)
        old_hi = min(hi, n_old)
        if lo < old_hi:
            data[: old_hi - lo] = old_store.read_rows(range(lo, old_hi))
        first_new = max(lo, n_old)
        if first_new < hi:
            data[first_new - lo :] = (
                init if fitted is None else fitted.take(first_new - n_old, hi - n_old)
            )
        store.write_chunk(chunk, data)
        if bar is not None:
            bar.update(hi - lo)
    if bar is not None:
        bar.close()
    store.sync()
    # The checkpoint's slots.npy is what a resume reads; the store's own table stays
    # uncommitted, so a crash before the commit below leaves a store that growing again reuses.
    store.commit(persist=False)
    state = {k: v for k, v in commit.state.items() if k not in ("format", "version")} | {
        "epoch": 0,
        "batch_in_epoch": 0,
        "num_images": n_new,
        "shards": cfg.data.shards,
        "store_url": new_url,
        "grown_from": {"run": str(old_dir), "commit": commit.tag, "num_images": n_old},
    }
    return checkpoint.commit_copy(commit, cfg.run_dir, state, store.committed)
