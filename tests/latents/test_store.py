"""The Zarr latent store: O(1) creation, initial rows, shadow slots, and refusing bad opens."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_dist.latents.store import (
    LatentStore,
    auto_rows_per_chunk,
    chunk_bounds,
    chunks_of_rows,
    num_chunks,
)

SIG = {"phi_size": 6, "preset": "test", "latent_widths": [2]}
INITIAL = np.arange(6, dtype=np.float32)


def make(url, rows=10, per_chunk=4, **kw):
    return LatentStore.create(
        url, num_rows=rows, initial=INITIAL, signature=SIG, rows_per_chunk=per_chunk, **kw
    )


def test_index_arithmetic():
    assert num_chunks(10, 4) == 3
    assert chunk_bounds(2, 4, 10) == (8, 10)
    assert list(chunks_of_rows(4, 8, 4)) == [1, 2]
    assert list(chunks_of_rows(3, 2, 4)) == [0, 1]
    assert list(chunks_of_rows(0, 0, 4)) == []
    # largest divisor of 1000 whose chunk fits in 8 MB at 97,792 bytes per row: 8 MB / 97,792
    # = 85.8, and the largest divisor of 1000 up to 85 is 50.
    assert auto_rows_per_chunk(1000, 97_792) == 50
    assert auto_rows_per_chunk(7, 1 << 30) == 1
    # On object storage, up to 16 MB: 171.6 rows, and the largest divisor up to it is 125.
    assert auto_rows_per_chunk(1000, 97_792, 16 << 20) == 125


def test_the_automatic_chunk_is_larger_on_object_storage(tmp_path):
    from lcm_dist.config import config_from_dict
    from lcm_dist.latents.run_store import rows_per_chunk_for

    def rows(url):
        raw = {"run_dir": str(tmp_path), "model": {"preset": "paper"}, "store": {"url": url}}
        raw["data"] = {"shards": "unused"}
        raw["train"] = {"max_steps": 1}
        raw["deepspeed"] = {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
        return rows_per_chunk_for(config_from_dict(raw), 1000)

    assert rows("") == rows(str(tmp_path / "l.zarr")) == rows("file:///x/l.zarr") == 50
    assert rows("memory://l.zarr") == 50
    assert rows("s3://bucket/l.zarr") == rows("gs://bucket/l.zarr") == 125


@pytest.fixture(params=["local", "memory", "s3"])
def where(request, tmp_path):
    """(url, storage options) of a fresh store location on each backend."""
    if request.param == "local":
        return str(tmp_path / "latents.zarr"), None
    if request.param == "memory":
        return f"memory://{tmp_path.name}/latents.zarr", None
    prefix, options = request.getfixturevalue("s3_server")
    return f"{prefix}/{tmp_path.name}/latents.zarr", options


def test_new_store_reads_initial_and_writes_round_trip(where):
    url, options = where
    store = make(url, storage_options=options)
    np.testing.assert_array_equal(store.read_rows([0, 9]), np.stack([INITIAL, INITIAL]))
    assert store.counters.bytes_read == 0  # never-written chunks cost no I/O
    data = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    store.write_chunk(1, data)
    np.testing.assert_array_equal(store.read_chunk(1), data)
    assert store.changes() == {1: 0}
    store.commit()
    reopened = LatentStore.open(url, signature=SIG, min_rows=10, storage_options=options)
    np.testing.assert_array_equal(reopened.read_rows([4, 5, 6, 7]), data)
    np.testing.assert_array_equal(reopened.read_rows([8]), INITIAL[None])


def test_writes_never_touch_the_committed_slot(where):
    url, options = where
    store = make(url, storage_options=options)
    first = np.full((4, 6), 1.0, dtype=np.float32)
    store.write_chunk(0, first)
    store.commit()
    store.write_chunk(0, first + 1)  # goes to the other slot
    store.write_chunk(0, first + 2)  # and again there: the committed copy stays intact
    # A process that died here: reopening sees the committed state.
    reopened = LatentStore.open(url, signature=SIG, storage_options=options)
    np.testing.assert_array_equal(reopened.read_chunk(0), first)
    np.testing.assert_array_equal(store.read_chunk(0), first + 2)
    store.commit()
    reopened = LatentStore.open(url, storage_options=options)
    np.testing.assert_array_equal(reopened.read_chunk(0), first + 2)


def test_float16_storage_and_short_last_chunk(tmp_path):
    store = make(str(tmp_path / "h.zarr"), rows=10, per_chunk=4, dtype="float16", codec="zstd")
    data = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    store.write_chunk(2, data)
    np.testing.assert_allclose(store.read_chunk(2), data, atol=1e-3)
    assert store.counters.bytes_written == 2 * 6 * 2


def test_creation_is_constant_size(tmp_path):
    make(str(tmp_path / "s.zarr"), rows=100)
    huge = make(str(tmp_path / "h.zarr"), rows=10_000_000_000 // 6, per_chunk=1000)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert huge.num_rows > 10**9
    assert size(tmp_path / "h.zarr") < 2 * size(tmp_path / "s.zarr") + 1000


def test_refuses_other_model_small_store_and_bad_urls(tmp_path):
    url = str(tmp_path / "latents.zarr")
    make(url)
    before = sorted(p.name for p in (tmp_path / "latents.zarr").rglob("*"))
    with pytest.raises(ValueError, match=r"made for another model \(phi_size: store 6 vs config 7"):
        LatentStore.open(url, signature={**SIG, "phi_size": 7})
    with pytest.raises(ValueError, match="holds 10 rows but the dataset has 11 images"):
        LatentStore.open(url, signature=SIG, min_rows=11)
    with pytest.raises(ValueError, match="already exists"):
        make(url)
    assert sorted(p.name for p in (tmp_path / "latents.zarr").rglob("*")) == before
    with pytest.raises(ValueError, match=r"no latent store at .*missing.zarr"):
        LatentStore.open(str(tmp_path / "missing.zarr"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"latent store at .*file/sub"):
        make(str(tmp_path / "file" / "sub"))
    with pytest.raises(ValueError, match=r"nosuchproto://x"):
        LatentStore.open("nosuchproto://x")
    with pytest.raises(ValueError, match=r"cannot open the latent store at nosuchproto://x"):
        LatentStore.exists("nosuchproto://x")


def test_a_written_chunk_that_goes_missing_is_an_error_not_zeros(tmp_path):
    url = str(tmp_path / "latents.zarr")
    store = make(url)
    store.write_chunk(0, np.ones((4, 6), np.float32))
    store.commit()
    files = list((tmp_path / "latents.zarr" / "slot0").rglob("c/0/*"))  # the first write's slot
    assert len(files) == 1
    files[0].unlink()  # lost by a bad copy or a storage fault
    reopened = LatentStore.open(url, signature=SIG)
    with pytest.raises(ValueError, match=r"chunk 0 \(rows 0-3\) of slot0 .* is missing or damaged"):
        reopened.read_chunk(0)
