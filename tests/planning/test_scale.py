"""The planner at any scale: sampled replays against whole ones, and the object store's
objects, requests and cost."""

from __future__ import annotations

import json

import pytest

from lcm_dist.config import config_from_dict
from lcm_dist.data.plan import shards_for_rank
from lcm_dist.planning import replay
from lcm_dist.planning.object_store import StorePrices
from lcm_dist.planning.replay import (
    _window_shards,
    epoch_row_order,
    replay_epochs,
    synthetic_manifest,
)

PHI = 100  # floats per row: the replay's bytes scale with it, its decisions do not


def _cfg(batch, workers, shuffle, rows_per_chunk, cache_rows, every):
    return config_from_dict(
        {
            "run_dir": "unused",
            "model": {"preset": "demo32"},
            "data": {
                "shards": "unused",
                "batch_size": batch,
                "num_workers": workers,
                "shuffle_buffer": shuffle,
            },
            "train": {"max_steps": 100, "inner_steps": 1},
            "store": {"rows_per_chunk": rows_per_chunk, "cache_bytes": cache_rows * PHI * 4},
            "checkpoint": {"every_steps": every},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
        }
    )


# (images, samples per shard, processes, config): 3,125 batches per epoch, sampled at 400-500.
SAMPLED = [
    # The steady state: every chunk read and written once, checkpoints write back a little.
    (200_000, 1000, 2, _cfg(32, 2, 256, 50, 1600, 500)),
    # A budget below the shuffle window: chunks leave early and come back (~4x the traffic).
    (100_000, 500, 1, _cfg(32, 2, 2000, 50, 3000, 300)),
]


@pytest.mark.parametrize("images,sps,world,cfg", SAMPLED)
def test_a_sampled_replay_predicts_the_whole_one(images, sps, world, cfg, monkeypatch):
    manifest = synthetic_manifest(images, sps, 32)
    sampled = replay_epochs(cfg, manifest, world, 0, 50, PHI)
    assert sampled[0].replayed_steps < sampled[0].steps == 3125
    monkeypatch.setattr(replay, "FULL_REPLAY_STEPS", 10**9)
    whole = replay_epochs(cfg, manifest, world, 0, 50, PHI)
    assert whole[0].replayed_steps == whole[0].steps
    total = lambda epochs: sum(e.bytes_read + e.bytes_written for e in epochs)  # noqa: E731
    assert total(sampled) == pytest.approx(total(whole), rel=0.03)
    for s, w in zip(sampled, whole, strict=True):
        assert s.bytes_read + s.bytes_written == pytest.approx(
            w.bytes_read + w.bytes_written, rel=0.05
        )
        assert s.peak_resident_bytes == pytest.approx(w.peak_resident_bytes, rel=0.05)
        assert s.dirty_peak_bytes == pytest.approx(w.dirty_peak_bytes, rel=0.05)


@pytest.mark.parametrize("workers,sps", [(1, 100), (3, 64), (4, 1000)])
def test_a_window_of_shards_starts_the_epoch_as_all_of_them(workers, sps):
    manifest = synthetic_manifest(50 * sps - 7, sps, 32)  # a short last shard
    ids = shards_for_rank(len(manifest["shards"]), 0, 1, 0, 1)
    full = epoch_row_order(manifest, ids, workers, 37, 0, 1, 0)
    for rows in (1, sps, 3 * sps + 5, 7 * sps):
        window = _window_shards(ids, workers, manifest, rows)
        assert len(window) < len(ids)
        part = epoch_row_order(manifest, window, workers, 37, 0, 1, 0)
        assert part.size >= rows
        assert (part[:rows] == full[:rows]).all()


def test_a_synthetic_manifest_of_a_billion_images_is_made_lazily():
    shards = synthetic_manifest(1_000_000_000 - 1, 1000, 128)["shards"]
    assert len(shards) == 1_000_000
    assert shards[-1] == {"name": "shard-999999.tar", "first_row": 999_999_000, "count": 999}
    assert shards[3] == {"name": "shard-000003.tar", "first_row": 3000, "count": 1000}
    assert [e["first_row"] for e in shards[1:3]] == [1000, 2000]
    with pytest.raises(IndexError):
        shards[1_000_000]


def _plan(cli, *flags):
    args = ["--images", "1000000000", "--nodes", "32", "--gpus-per-node", "8", "--json"]
    proc = cli("plan", "--config", "configs/big.json", *args, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_plan_of_a_billion_images_prices_the_store(cli):
    plan = _plan(cli)
    prices = StorePrices()
    rows = plan["rows_per_chunk"]
    assert rows == 50  # the largest divisor of 1,000 samples per shard within 8 MB of phi
    assert plan["objects_per_slot"] == 1_000_000_000 // rows
    assert plan["storage_cost_per_month"] == pytest.approx(
        plan["store_bytes"] / 2**30 * prices.storage_per_gb_month
    )
    # Every process reads and writes each of its chunks once an epoch, and checkpoints write
    # some back again: all chunks read once, written a little more than once.
    assert plan["get_requests_per_epoch"] == pytest.approx(plan["objects_per_slot"], rel=0.02)
    assert 1 <= plan["put_requests_per_epoch"] / plan["objects_per_slot"] < 1.1
    epoch = plan["steps_per_epoch"] * plan["step_seconds"]
    assert plan["get_requests_per_second"] == pytest.approx(plan["get_requests_per_epoch"] / epoch)
    assert plan["request_cost_per_epoch"] == pytest.approx(
        plan["get_requests_per_epoch"] / 1000 * prices.get_per_1000
        + plan["put_requests_per_epoch"] / 1000 * prices.put_per_1000
    )
    assert plan["node_bytes_per_second"] == pytest.approx(
        plan["store_bytes_per_second"] / 32, rel=0.01
    )
    assert not any("requests/s" in w for w in plan["warnings"])

    # Prices and limits are flags; past a limit, the warning names the settings that fix it.
    other = _plan(cli, "--put-price", "0.01", "--get-price", "0", "--put-limit", "100")
    assert not any("requests/s" in w for w in other["warnings"])  # the store is a local path
    s3 = "store.url=s3://bucket/latents.zarr"
    other = _plan(cli, "--put-price", "0.01", "--get-price", "0", "--put-limit", "100", "--set", s3)
    assert other["request_cost_per_epoch"] == pytest.approx(
        other["put_requests_per_epoch"] / 1000 * 0.01
    )
    # On object storage the automatic chunk is up to 16 MB: 125 rows, 8,000,000 objects.
    assert other["rows_per_chunk"] == 125 and other["objects_per_slot"] == 8_000_000
    (warning,) = [w for w in other["warnings"] if "requests/s" in w]
    assert "PUT requests/s on one slot's key prefix, above the 100 per second" in warning
    assert "store.rows_per_chunk above 125" in warning and "store.dtype float16" in warning


def test_bad_price_flags_are_one_line_errors(cli):
    proc = cli("plan", "--config", "configs/big.json", "--images", "1000", "--get-limit", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --get-limit must be positive"
    proc = cli("plan", "--config", "configs/big.json", "--images", "1000", "--put-price", "-1")
    assert proc.stderr.strip() == "error: --put-price must not be negative"
