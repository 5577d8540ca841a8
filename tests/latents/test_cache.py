"""The write-back cache: same results as all latents in RAM, bounded memory, once-per-epoch I/O,
and two gloo ranks that together update every row exactly once per epoch."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lcm_dist.data.loader import ShardLoader
from lcm_dist.data.plan import chunk_need_order
from lcm_dist.data.shards import write_shards
from lcm_dist.latents.cache import StoreIOError, WriteBackCache
from lcm_dist.latents.store import LatentStore
from lcm_dist.latents.table import InMemoryLatentTable
from tests.helpers import free_port

P = 5
ROWS_PER_CHUNK = 4
SIG = {"phi_size": P, "preset": "test"}
INITIAL = torch.linspace(-1, 1, P)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from PIL import Image

    out = tmp_path_factory.mktemp("cache-shards")
    images = ((f"k{i}", Image.new("RGB", (4, 4), (i, 0, 0))) for i in range(42))
    write_shards(images, out, 4, 8, progress=False)  # 5 shards of 8 and one of 2
    return out


def new_store(url, rows=42, options=None):
    return LatentStore.create(
        url,
        num_rows=rows,
        initial=INITIAL.numpy(),
        signature=SIG,
        rows_per_chunk=ROWS_PER_CHUNK,
        storage_options=options,
    )


def update(phi: torch.Tensor, rows: torch.Tensor, epoch: int) -> torch.Tensor:
    """A deterministic stand-in for a training step that depends on the row and its old value."""
    return phi * 0.5 + rows[:, None].float() * (epoch + 1) + torch.arange(P)


def run_epochs(latents, shards, epochs, workers=0, rank=0, world=1, touched=None):
    loader = ShardLoader(
        shards, batch_size=3, rank=rank, world_size=world, num_workers=workers, shuffle_buffer=5
    )
    for epoch in range(epochs):
        ids, _ = loader.plan(epoch)
        latents.begin_epoch(chunk_need_order(loader.manifest, ids, workers, ROWS_PER_CHUNK))
        for batch in loader.epoch_batches(epoch):
            phi = latents.read_rows(batch.rows)
            latents.write_rows(batch.rows, update(phi, batch.rows, epoch))
            if touched is not None:
                touched.setdefault(epoch, set()).update((batch.rows // ROWS_PER_CHUNK).tolist())
        latents.end_epoch()
        latents.commit()


@pytest.mark.parametrize("budget_chunks,prefetch", [(64, 64), (3, 2), (3, 0)])
def test_same_result_as_in_ram_within_budget(tmp_path, shards, budget_chunks, prefetch):
    reference = InMemoryLatentTable(42, INITIAL)
    run_epochs(reference, shards, 3)
    budget = budget_chunks * ROWS_PER_CHUNK * P * 4
    cache = WriteBackCache(new_store(str(tmp_path / "s.zarr")), budget, 2, prefetch)
    run_epochs(cache, shards, 3, workers=2)
    cache.close()
    assert cache.peak_resident <= budget
    # Reopened from disk: the committed state equals the in-RAM reference bit for bit.
    stored = LatentStore.open(str(tmp_path / "s.zarr")).read_rows(range(42))
    torch.testing.assert_close(torch.from_numpy(stored), reference.rows, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["memory", "s3"])
def test_same_result_on_other_backends(request, tmp_path, shards, backend):
    reference = InMemoryLatentTable(42, INITIAL)
    run_epochs(reference, shards, 2)
    if backend == "s3":
        prefix, options = request.getfixturevalue("s3_server")
        url = f"{prefix}/{tmp_path.name}/s.zarr"
    else:
        url, options = f"memory://{tmp_path.name}/s.zarr", None
    cache = WriteBackCache(new_store(url, options=options), 5 * ROWS_PER_CHUNK * P * 4, 2, 4)
    run_epochs(cache, shards, 2, workers=2)
    cache.close()
    stored = LatentStore.open(url, storage_options=options).read_rows(range(42))
    torch.testing.assert_close(torch.from_numpy(stored), reference.rows, rtol=0, atol=0)


def test_each_chunk_read_and_written_once_per_epoch(tmp_path, shards):
    store = new_store(str(tmp_path / "s.zarr"))
    cache = WriteBackCache(store, 1 << 20, 2, 64)
    run_epochs(cache, shards, 1, workers=2)
    assert store.counters.chunk_reads == 0  # epoch 0 starts from the initial phi: no reads
    assert store.counters.chunk_writes == 11
    run_epochs(cache, shards, 1, workers=2)
    assert store.counters.chunk_reads == 11
    assert store.counters.chunk_writes == 22
    assert store.counters.bytes_read + store.counters.bytes_written == 3 * store.nbytes


def test_prefetch_reads_ahead_and_returns_the_right_rows(tmp_path):
    store = new_store(str(tmp_path / "s.zarr"), rows=16)
    for chunk in range(4):
        store.write_chunk(chunk, np.full((4, P), chunk, dtype=np.float32) + np.arange(4)[:, None])
    store.commit()
    cache = WriteBackCache(store, 1 << 20, 1, 2)
    cache.begin_epoch([2, 0, 3, 1])
    cache.flush()  # waits for the prefetches
    assert sorted(cache._entries) == [0, 2]  # 2 chunks ahead of the start: order[0:2]
    reads = store.counters.chunk_reads
    rows = torch.tensor([9, 1, 14])
    got = cache.read_rows(rows)
    expected = torch.tensor([[2 + 1.0] * P, [0 + 1.0] * P, [3 + 2.0] * P])
    torch.testing.assert_close(got, expected)
    cache.flush()
    assert store.counters.chunk_reads == reads + 2  # chunk 3 on demand, then 1 ahead of it
    assert sorted(cache._entries) == [0, 1, 2, 3]
    torch.testing.assert_close(cache.read_rows(torch.tensor([5])), torch.full((1, P), 2.0))


def test_rows_done_before_a_resume_are_not_read_again(tmp_path):
    store = new_store(str(tmp_path / "s.zarr"), rows=16)
    for chunk in range(4):
        store.write_chunk(chunk, np.full((4, P), chunk, dtype=np.float32))
    store.commit()
    cache = WriteBackCache(store, 1 << 20, 1, 64)
    # The interrupted epoch had finished chunk 2 and half of chunk 0.
    cache.begin_epoch([2, 0, 3, 1], done_rows=torch.tensor([9, 8, 11, 10, 0, 1]))
    cache.flush()
    assert sorted(cache._entries) == [0, 1, 3]
    assert store.counters.chunk_reads == 3
    # Chunk 0 is complete once its two remaining rows come back: written and let go.
    writes = store.counters.chunk_writes
    cache.write_rows(torch.tensor([2, 3]), cache.read_rows(torch.tensor([2, 3])) + 1)
    cache.flush()
    assert store.counters.chunk_writes == writes + 1 and 0 not in cache._entries
    assert store.read_chunk(0)[:, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(IndexError, match="row 16 is outside the latent store's 16 rows"):
        cache.begin_epoch([0], done_rows=torch.tensor([16]))


def test_background_write_failure_is_reported(tmp_path, monkeypatch):
    store = new_store(str(tmp_path / "s.zarr"), rows=8)
    cache = WriteBackCache(store, 1 << 20, 1, 0)

    def full_disk(chunk, data, abort=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_chunk", full_disk)
    rows = torch.arange(4)
    cache.write_rows(rows, cache.read_rows(rows))  # completes chunk 0: written in background
    with pytest.raises(StoreIOError, match=r"writing chunk 0 of latent store .*No space left"):
        cache.flush()
    # Nothing was committed: the store still reads the initial rows.
    assert LatentStore.open(str(tmp_path / "s.zarr")).changes() == {}


def test_chunk_leaving_under_pressure_is_kept_when_needed_again(tmp_path, monkeypatch):
    # Under memory pressure a dirty chunk is written back to leave; if the next batch needs it
    # while that write is in flight, it must stay (not vanish when the write completes).
    store = new_store(str(tmp_path / "s.zarr"), rows=16)
    write = store.write_chunk
    started = []

    def slow_write(chunk, data, abort=None):
        started.append(chunk)
        time.sleep(0.3)
        write(chunk, data)

    monkeypatch.setattr(store, "write_chunk", slow_write)
    cache = WriteBackCache(store, 4 * ROWS_PER_CHUNK * P * 4, 1, 0)
    rows = torch.tensor([0, 1])
    cache.write_rows(rows, cache.read_rows(rows) + 1.0)  # chunk 0 dirty, half its rows seen
    with cache._cond:
        cache._start_write(0, drop=True)  # as _make_room does for a dirty victim
    got = cache.read_rows(torch.tensor([0, 1, 2]))
    assert started == [0]
    torch.testing.assert_close(got, INITIAL.expand(3, P) + torch.tensor([[1.0], [1.0], [0.0]]))
    cache.write_rows(torch.arange(4), cache.read_rows(torch.arange(4)))
    cache.close()
    assert 0 not in cache._entries  # once complete it left as usual


def test_budget_smaller_than_a_batch_is_refused(tmp_path):
    store = new_store(str(tmp_path / "s.zarr"), rows=16)
    with pytest.raises(ValueError, match="smaller than one chunk"):
        WriteBackCache(store, 10)
    cache = WriteBackCache(store, 2 * ROWS_PER_CHUNK * P * 4)
    with pytest.raises(ValueError, match="cannot hold the 3 chunks one batch touches"):
        cache.read_rows(torch.tensor([0, 5, 9]))


def _rank_main(rank, world, port, shards, url, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lcm_dist.train.batches import share_latent_slots as _share_latent_slots

    if rank == 0:
        new_store(url)
    dist.barrier()
    cache = WriteBackCache(LatentStore.open(url, signature=SIG), 1 << 20, 2, 8)
    loader = ShardLoader(shards, batch_size=3, rank=rank, world_size=world, num_workers=2)
    touched = {}
    for epoch in range(2):
        ids, _ = loader.plan(epoch)
        cache.begin_epoch(chunk_need_order(loader.manifest, ids, 2, ROWS_PER_CHUNK))
        for batch in loader.epoch_batches(epoch):
            phi = cache.read_rows(batch.rows)
            cache.write_rows(batch.rows, phi + 1.0)  # +1 per update: lost or doubled shows
            touched.setdefault(epoch, set()).update((batch.rows // ROWS_PER_CHUNK).tolist())
        cache.end_epoch()
        _share_latent_slots(cache)
        cache.commit(persist=rank == 0)
    cache.close()
    torch.save({e: sorted(c) for e, c in touched.items()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_disjoint_chunks_every_row_once_per_epoch(tmp_path, shards):
    url = str(tmp_path / "s.zarr")
    mp.spawn(_rank_main, args=(2, free_port(), shards, url, str(tmp_path)), nprocs=2)
    touched = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for epoch in range(2):
        a, b = set(touched[0][epoch]), set(touched[1][epoch])
        assert not a & b, f"epoch {epoch}: both ranks touched chunks {sorted(a & b)}"
        assert a | b == set(range(11))
    stored = LatentStore.open(url).read_rows(range(42))
    np.testing.assert_array_equal(stored, np.tile(INITIAL.numpy() + 2.0, (42, 1)))


def test_io_threads_yield_to_the_step(tmp_path):
    import os

    def niceness_of_io_threads(by):
        cache = WriteBackCache(
            new_store(str(tmp_path / f"s{by}.zarr"), rows=8), 1 << 20, 2, 4, io_niceness=by
        )
        try:
            return cache._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result()
        finally:
            cache.close()

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness_of_io_threads(0) == mine
    assert niceness_of_io_threads(3) == min(mine + 3, 19)  # relative to the process's own
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # the step's thread is untouched
