"""The store's direct chunk-file I/O on a local disk: the same files zarr reads and writes,
overwritten in place, damage reported, and writes made durable by ``sync``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from lcm_dist.latents.chunk_files import LocalChunkFiles
from lcm_dist.latents.store import LatentStore

SIG = {"phi_size": 6, "preset": "test", "latent_widths": [2]}
INITIAL = np.arange(6, dtype=np.float32)


def make(url, rows=10, per_chunk=4, **kw):
    return LatentStore.create(
        url, num_rows=rows, initial=INITIAL, signature=SIG, rows_per_chunk=per_chunk, **kw
    )


def rows(n, seed):
    return np.random.default_rng(seed).uniform(-0.01, 0.01, (n, 6)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("prefix", ["", "file://"])
def test_direct_files_are_the_files_zarr_reads_and_writes(tmp_path, dtype, prefix):
    path = tmp_path / "latents.zarr"
    store = make(prefix + str(path), dtype=dtype)
    assert all(files is not None for files in store._files)  # the direct path is in use
    # The store writes (the last chunk is short: rows 8-9), plain zarr reads.
    written = {c: rows(n, c) for c, n in ((0, 4), (2, 2))}
    for chunk, data in written.items():
        store.write_chunk(chunk, data)
    group = zarr.open_group(str(path), mode="r")
    for chunk, data in written.items():
        start = chunk * 4
        got = group[f"slot{store.live[chunk]}"][start : start + len(data)]
        np.testing.assert_array_equal(got, data.astype(dtype))
    # Plain zarr writes (into the slot the store reads), the store reads.
    theirs = rows(2, 7).astype(dtype)
    zarr.open_group(str(path), mode="r+")[f"slot{store.live[2]}"][8:10] = theirs
    np.testing.assert_array_equal(store.read_chunk(2), theirs.astype(np.float32))


def test_compressed_and_remote_stores_go_through_zarr(tmp_path):
    assert make(str(tmp_path / "z.zarr"), codec="zstd")._files == [None, None]
    memory = make(f"memory://{tmp_path.name}/m.zarr")
    assert [LocalChunkFiles.of(array) for array in memory._data] == [None, None]


def test_a_chunk_is_rewritten_in_place(tmp_path):
    store = make(str(tmp_path / "latents.zarr"))
    store.write_chunk(1, rows(4, 1))
    path = store._files[store.live[1]].path(1)
    inode = os.stat(path).st_ino
    store.write_chunk(1, rows(4, 2))  # same uncommitted slot: the same file, overwritten
    assert os.stat(path).st_ino == inode
    np.testing.assert_array_equal(store.read_chunk(1), rows(4, 2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["0"]  # no temporary files left


def test_a_torn_write_to_the_uncommitted_slot_leaves_the_committed_rows(tmp_path):
    url = str(tmp_path / "latents.zarr")
    store = make(url)
    store.write_chunk(0, rows(4, 1))
    store.commit()
    store.write_chunk(0, rows(4, 2))  # the other slot
    torn = store._files[store.live[0]].path(0)
    with open(torn, "r+b") as f:  # a crash or a full disk half way through the write
        f.truncate(40)
    reopened = LatentStore.open(url, signature=SIG)
    np.testing.assert_array_equal(reopened.read_chunk(0), rows(4, 1))
    # Had it been committed, the short file would be reported, not read as rows.
    reopened.apply_changes({0: int(store.live[0])})
    with pytest.raises(ValueError, match=r"chunk 0 \(rows 0-3\) of slot1 .* missing or damaged"):
        reopened.read_chunk(0)


def test_sync_makes_each_write_durable_once(tmp_path, monkeypatch):
    store = make(str(tmp_path / "latents.zarr"), rows=12)
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))
    )
    store.write_chunk(0, rows(4, 0))
    store.write_chunk(2, rows(4, 2))
    store.sync()
    slot = tmp_path / "latents.zarr" / f"slot{store.live[0]}"
    files = [str(slot / "c" / str(c) / "0") for c in (0, 2)]
    dirs = [str(slot / "c" / str(c)) for c in (0, 2)] + [str(slot / "c"), str(slot)]
    assert sorted(synced) == sorted(files + dirs)
    synced.clear()
    store.sync()
    assert synced == []  # nothing written since
    store.write_chunk(0, rows(4, 3))  # an existing file: only it is synced
    store.sync()
    assert synced == [files[0]]


def test_a_full_disk_is_reported_and_retried_by_the_next_sync(tmp_path, monkeypatch):
    store = make(str(tmp_path / "latents.zarr"))
    store.write_chunk(0, rows(4, 0))
    real = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.sync()
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    store.sync()
    assert len(synced) == 4  # the file and the three directories made for it


def test_a_checkpoint_syncs_the_chunk_files_before_it_commits(tmp_path, demo_shards, monkeypatch):
    from lcm_dist.config import load_config
    from lcm_dist.train import checkpoint
    from lcm_dist.train.trainer import Trainer
    from tests.helpers import process_state, run_config

    events = []
    real_sync, real_save = LatentStore.sync, checkpoint.save

    def sync(store):
        events.append(("sync", sum(len(f._unsynced) for f in store._files if f)))
        real_sync(store)

    def save(*args, **kwargs):
        events.append(("save", None))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(LatentStore, "sync", sync)
    monkeypatch.setattr(checkpoint, "save", save)
    cfg = load_config(
        run_config(
            tmp_path,
            demo_shards,
            train={"max_steps": 8, "inner_steps": 1},
            store={"rows_per_chunk": 8, "cache_bytes": 3 * 8 * 24448 * 4},
            log={"every_steps": 100, "image_every_steps": 0},
        )
    )
    with process_state():
        trainer = Trainer(cfg)
        try:
            for step in range(1, 9):
                trainer.step(step)
            trainer.checkpoint(8)
        finally:
            trainer.close(8)
    # 8 steps of 4 images filled 4 chunks; the flush wrote those still dirty; all are synced
    # before the checkpoint is written and committed.
    assert events == [("sync", 4), ("save", None)]
