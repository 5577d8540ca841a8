"""Streaming shards: every image exactly once per epoch across ranks and workers, with its row;
bad shards stop with an error naming the shard and sample."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_dist.data.loader import ShardDecodeError, ShardLoader
from lcm_dist.data.plan import batch_sizes, shards_for_rank
from lcm_dist.data.shards import write_shards

SIZE = 8


def _image(row: int) -> Image.Image:
    """An image whose pixels encode its row, so a mismatched (row, image) pair is detectable."""
    rng = np.random.default_rng(row)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _expected(row: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(_image(row)).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data-shards")
    # 10 shards of 5 and one of 3: uneven on purpose.
    write_shards(((f"k{i}", _image(i)) for i in range(53)), out, SIZE, 5, progress=False)
    return out


def _epoch(shards, rank, world, epoch, workers=2, batch=4, **kw):
    loader = ShardLoader(
        shards,
        batch_size=batch,
        rank=rank,
        world_size=world,
        seed=7,
        num_workers=workers,
        shuffle_buffer=6,
        **kw,
    )
    return loader, list(loader.epoch_batches(epoch))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_every_image_once_per_epoch_with_its_row(shards, world, workers):
    for epoch in range(2):
        seen = []
        steps = set()
        for rank in range(world):
            loader, batches = _epoch(shards, rank, world, epoch, workers=workers)
            steps.add(len(batches))
            assert len(batches) == loader.steps_per_epoch
            for i, batch in enumerate(batches):
                assert batch.epoch == epoch and batch.step_in_epoch == i
                assert batch.images.shape[1:] == (3, SIZE, SIZE)
                assert 1 <= len(batch.rows) <= 4
                for row, image in zip(batch.rows.tolist(), batch.images, strict=True):
                    torch.testing.assert_close(image, _expected(row), rtol=0, atol=0)
                seen.extend(batch.rows.tolist())
        assert len(steps) == 1, "ranks must take the same number of steps per epoch"
        assert sorted(seen) == list(range(53))


def test_order_is_reshuffled_each_epoch_and_ranks_are_disjoint(shards):
    a = shards_for_rank(11, 7, 0, 0, 2) + shards_for_rank(11, 7, 0, 1, 2)
    assert sorted(a) == list(range(11))
    assert shards_for_rank(11, 7, 0, 0, 2) != shards_for_rank(11, 7, 1, 0, 2)
    _, e0 = _epoch(shards, 0, 1, 0, workers=0)
    _, e1 = _epoch(shards, 0, 1, 1, workers=0)
    assert torch.cat([b.rows for b in e0]).tolist() != torch.cat([b.rows for b in e1]).tolist()


def test_same_seed_same_order_and_start_step_skips(shards):
    loader, first = _epoch(shards, 1, 2, 0)
    _, again = _epoch(shards, 1, 2, 0)
    assert [b.rows.tolist() for b in first] == [b.rows.tolist() for b in again]
    steps = loader.steps_per_epoch
    full = ShardLoader(shards, batch_size=4, rank=1, world_size=2, seed=7, shuffle_buffer=6)
    stream = iter(full)
    reference = [next(stream).rows.tolist() for _ in range(steps + 3)]
    resumed = ShardLoader(
        shards, batch_size=4, rank=1, world_size=2, seed=7, shuffle_buffer=6, start_batch=steps - 2
    )
    stream = iter(resumed)
    batches = [next(stream) for _ in range(5)]
    assert [b.rows.tolist() for b in batches] == reference[steps - 2 :]
    # The first batch after the skip names the rows the skipped batches held (for the cache),
    # the rest name none.
    skipped = sorted(r for rows in reference[: steps - 2] for r in rows)
    assert sorted(batches[0].skipped_rows.tolist()) == skipped
    assert all(b.skipped_rows is None for b in batches[1:])
    assert next(iter(full)).skipped_rows is None


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_streams_its_epochs_through_one_set_of_workers(shards, monkeypatch, workers):
    """Iterating a loader gives, epoch after epoch, exactly the batches of each epoch on its
    own (rows and pixels), also when it starts mid-epoch, while its worker processes are
    started once for the whole run, not once per epoch."""
    import lcm_dist.data.loader as loader_module

    kw = dict(batch_size=4, rank=1, world_size=2, seed=7, num_workers=workers, shuffle_buffer=6)
    single = ShardLoader(shards, **kw)
    steps = single.steps_per_epoch
    every = [b for epoch in range(3) for b in single.epoch_batches(epoch)]
    expected = every[3:]

    made = []
    real = torch.utils.data.DataLoader

    def counting(*args, **kwargs):
        made.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module.torch.utils.data, "DataLoader", counting)
    stream = iter(ShardLoader(shards, start_batch=3, **kw))
    got = [next(stream) for _ in range(3 * steps - 3)]
    stream.close()
    assert made == [workers], "one DataLoader (one set of workers) for the whole run"
    assert [(b.epoch, b.step_in_epoch) for b in got] == [
        (b.epoch, b.step_in_epoch) for b in expected
    ]
    for ours, theirs in zip(got, expected, strict=True):
        assert torch.equal(ours.rows, theirs.rows)
        assert torch.equal(ours.pixels, theirs.pixels)
    skipped = sorted(torch.cat([b.rows for b in every[:3]]).tolist())
    assert sorted(got[0].skipped_rows.tolist()) == skipped
    assert all(b.skipped_rows is None for b in got[1:])


def _broken_in_epoch_1(tmp_path, shards) -> str:
    """A copy of the shards in which a shard that rank 0 of 2 reads in epoch 1, but not in
    epoch 0, is truncated; returns its name."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    later = set(shards_for_rank(11, 7, 1, 0, 2)) - set(shards_for_rank(11, 7, 0, 0, 2))
    name = f"shard-{min(later):06d}.tar"
    path = folder / name
    path.write_bytes(path.read_bytes()[:1600])
    return folder, name


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_a_later_epoch_comes_after_this_epoch(tmp_path, shards, workers):
    """The workers read on into the next epoch; a broken shard there stops the run only once
    the batches of this epoch have all been delivered, with the error naming the shard."""
    folder, name = _broken_in_epoch_1(tmp_path, shards)
    loader = ShardLoader(
        folder, batch_size=4, world_size=2, seed=7, num_workers=workers, shuffle_buffer=6
    )
    stream = iter(loader)
    for i in range(loader.steps_per_epoch):
        assert next(stream).epoch == 0, i
    with pytest.raises(ShardDecodeError, match=name):
        next(stream)


def test_a_loader_error_that_escapes_does_not_keep_the_process_alive(tmp_path, shards):
    """The workers ignore SIGTERM; an error's traceback must not keep them (and so the
    process, at exit) alive."""
    import subprocess
    import sys

    folder, _ = _broken_in_epoch_1(tmp_path, shards)
    script = (
        "from lcm_dist.data.loader import ShardLoader\n"
        f"loader = ShardLoader({str(folder)!r}, batch_size=4, world_size=2, seed=7, "
        "num_workers=2, shuffle_buffer=6)\n"
        "for batch in loader:\n"
        "    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "ShardDecodeError" in done.stderr


def test_batch_sizes_split_evenly():
    assert batch_sizes(10, 3) == [4, 3, 3]
    assert sum(batch_sizes(53, 14)) == 53


def _rewrite_member(path, member, data):
    """Replace one file's bytes inside a tar shard (keeps the others as they are)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for info, content in members:
            if info.name == member:
                if data is None:
                    continue
                content = data
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def _png(size):
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "member,data,message",
    [
        ("0000000002.png", b"\x89PNG garbage", r"sample 0000000002 in shard .*shard-000000.tar"),
        ("0000000003.png", _png(SIZE * 2), r"0000000003 .* is 16x16, expected 8x8"),
        ("0000000001.png", None, r"0000000001 .* lacks its .png"),
        ("0000000004.json", b'{"row": 40, "key": "x"}', r"has row 40, outside the shard's rows"),
    ],
)
def test_bad_sample_is_an_error_naming_it(tmp_path, member, data, message):
    write_shards(((f"k{i}", _image(i)) for i in range(10)), tmp_path, SIZE, 5, progress=False)
    _rewrite_member(tmp_path / "shard-000000.tar", member, data)
    loader = ShardLoader(tmp_path, batch_size=4, num_workers=2, shuffle_buffer=1)
    with pytest.raises(ShardDecodeError, match=message):
        list(loader.epoch_batches(0))


def test_missing_sample_pair_is_a_count_error(tmp_path):
    write_shards(((f"k{i}", _image(i)) for i in range(10)), tmp_path, SIZE, 5, progress=False)
    _rewrite_member(tmp_path / "shard-000001.tar", "0000000007.png", None)
    _rewrite_member(tmp_path / "shard-000001.tar", "0000000007.json", None)
    loader = ShardLoader(tmp_path, batch_size=4, shuffle_buffer=1)
    with pytest.raises(ShardDecodeError, match=r"shard-000001.tar holds 4 samples .* says 5"):
        list(loader.epoch_batches(0))


@pytest.mark.parametrize("cut", [1500, 1600])
def test_truncated_shard_is_named(tmp_path, cut):
    write_shards(((f"k{i}", _image(i)) for i in range(10)), tmp_path, SIZE, 5, progress=False)
    path = tmp_path / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:cut])
    loader = ShardLoader(tmp_path, batch_size=4, shuffle_buffer=1)
    with pytest.raises(ShardDecodeError) as err:
        list(loader.epoch_batches(0))
    if cut == 1500:  # cut between a sample's two files
        assert re.fullmatch(
            r"sample 0000000005 in shard .*shard-000001.tar lacks its .*", str(err.value)
        )
    else:  # cut inside the image file: a tar error, with the shard and where it broke
        assert re.fullmatch(
            r"cannot read shard .*shard-000001.tar after 0 of its 5 samples \(rows 5..9\): "
            r"[^<>]+; the file is truncated or damaged \(.*--verify checks every shard\)",
            str(err.value),
        ), str(err.value)


def test_missing_shard_set_and_too_many_ranks(tmp_path, shards):
    with pytest.raises(ValueError, match=r"no shard set at .*nowhere"):
        ShardLoader(tmp_path / "nowhere", batch_size=4)
    with pytest.raises(ValueError, match="has 11 shards, fewer than the 12 processes"):
        ShardLoader(shards, batch_size=4, world_size=12)
    with pytest.raises(ValueError, match="hold 8px images, not 32px"):
        ShardLoader(shards, batch_size=4, image_size=32)


def test_pixels_become_the_same_floats_on_every_device():
    from lcm_dist.data.loader import images_on

    pixels = torch.arange(256, dtype=torch.uint8).repeat(3).reshape(1, 16, 16, 3)
    host = images_on(pixels, torch.device("cpu"))
    assert host.shape == (1, 3, 16, 16) and host.is_contiguous()
    # Exactly v / 255, divided on the host; a multiplication by 1/255 (a GPU's division by a
    # scalar) misses the last bit of 126 of the 256 values, which is why a table is looked up.
    assert torch.equal(host, pixels.permute(0, 3, 1, 2).float() / 255.0)
    v = torch.arange(256, dtype=torch.float32)
    assert (v / 255.0 != v * (1 / 255.0)).sum() > 0
    # On another device the same table is indexed there (meta: shapes only).
    assert images_on(pixels, torch.device("meta")).shape == host.shape
