"""The store's direct chunk-file I/O on a local disk: the same files zarr reads and writes,
overwritten in place, damage reported, and writes made durable by ``sync``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from lcm_dist.latents.chunk_files import LocalChunkFiles
from lcm_dist.latents.retry import StoreIOError
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
    assert all(files.direct for files in store._files)  # the direct path is in use
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


def test_the_bytes_are_the_bytes_zarr_writes(tmp_path):
    store = make(str(tmp_path / "latents.zarr"), dtype="float16")
    data = rows(2, 3)
    store.write_chunk(2, data)  # the short edge chunk: padded with the fill value
    path = store._files[store.live[2]].path(2)
    ours = path.read_bytes()
    zarr.open_group(str(tmp_path / "latents.zarr"), mode="r+")[f"slot{store.live[2]}"][8:10] = data
    assert path.read_bytes() == ours


def test_compressed_and_remote_stores_go_through_zarr(tmp_path):
    compressed = make(str(tmp_path / "z.zarr"), codec="zstd")
    assert [files.direct for files in compressed._files] == [False, False]
    compressed.write_chunk(0, rows(4, 0))
    np.testing.assert_array_equal(compressed.read_chunk(0), rows(4, 0))
    memory = make(f"memory://{tmp_path.name}/m.zarr")
    assert [LocalChunkFiles.of(array) for array in memory._data] == [None, None]


def test_a_store_opened_read_only_is_not_written(tmp_path):
    url = str(tmp_path / "latents.zarr")
    make(url)
    store = LatentStore.open(url, mode="r")
    with pytest.raises(ValueError, match=r"latent store .* is open read-only; chunk 1 not"):
        store.write_chunk(1, rows(4, 1))
    assert not (tmp_path / "latents.zarr" / "slot0" / "c").exists()


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


@pytest.fixture
def synced(monkeypatch):
    """[(fsync or fdatasync, path)] of every sync call from now on."""
    calls = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def record(fd, real=real, name=name):
            calls.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(os, name, record)
    return calls


def test_sync_makes_each_write_durable_once(tmp_path, synced):
    url = str(tmp_path / "latents.zarr")
    store = make(url, rows=12)
    synced.clear()  # creating the store synced its metadata
    store.write_chunk(0, rows(4, 0))
    store.write_chunk(2, rows(4, 2))
    store.sync()
    slot = tmp_path / "latents.zarr" / f"slot{store.live[0]}"
    file0, file2 = (str(slot / "c" / str(c) / "0") for c in (0, 2))
    dirs = [str(slot / "c" / str(c)) for c in (0, 2)] + [str(slot / "c"), str(slot)]
    # New files: their data, sizes and directory entries, up to the new "c" in the slot.
    assert sorted(synced) == sorted(
        [("fsync", file0), ("fsync", file2)] + [("fsync", d) for d in dirs]
    )
    synced.clear()
    store.sync()
    assert synced == []  # nothing written since
    store.write_chunk(0, rows(4, 3))  # overwritten in place: only its data
    store.sync()
    assert synced == [("fdatasync", file0)]
    # Another process (a resumed run) writing the same file: its entry is synced once more,
    # as the process that made it may have died before it synced it.
    synced.clear()
    again = LatentStore.open(url, signature=SIG)
    again.write_chunk(0, rows(4, 4))
    again.sync()
    assert sorted(synced) == [("fdatasync", file0), ("fsync", dirs[0])]


def test_zarr_writes_of_a_compressed_local_store_are_synced_too(tmp_path, synced):
    store = make(str(tmp_path / "latents.zarr"), codec="zstd")
    store.write_chunk(1, rows(4, 1))
    store.sync()
    synced.clear()
    store.write_chunk(1, rows(4, 2))  # zarr renames a new file into place: entry and file
    store.sync()
    path = store._files[store.live[1]].path(1)
    assert sorted(synced) == [("fsync", str(path.parent)), ("fsync", str(path))]


def test_a_failed_sync_is_one_error_and_is_not_retried(tmp_path, monkeypatch, synced):
    store = make(str(tmp_path / "latents.zarr"))
    store.write_chunk(0, rows(4, 0))
    synced.clear()

    def full(fd):
        raise OSError(28, "No space left on device")

    recording = os.fsync
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreIOError) as err:
        store.sync()
    assert str(err.value).startswith(
        f"making the chunk writes of latent store {tmp_path / 'latents.zarr'} durable failed "
        "(no space left on device (syncing "
    )
    assert "the last checkpoint resumes" in str(err.value)
    # A second fsync could report success with the data lost: the writes are not synced again.
    monkeypatch.setattr(os, "fsync", recording)
    store.sync()
    assert synced == []
    store.write_chunk(0, rows(4, 1))  # the next write is synced again
    store.sync()
    assert synced == [("fdatasync", str(store._files[store.live[0]].path(0)))]


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
