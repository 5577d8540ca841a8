"""The run planner: its arithmetic, each of its warnings, and its predictions against a real run."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from lcm_dist.config import config_from_dict, load_config
from lcm_dist.data.loader import ShardLoader
from lcm_dist.data.plan import batch_sizes, chunk_need_order, shards_for_rank, steps_per_epoch
from lcm_dist.data.shards import load_manifest
from lcm_dist.latents.cache import WriteBackCache
from lcm_dist.latents.store import IOCounters
from lcm_dist.planning.cost import (
    Cluster,
    ModelCost,
    checkpoint_bytes,
    gradient_itemsize,
    inner_step_time,
    ring_traffic_bytes,
)
from lcm_dist.planning.plan import make_plan
from lcm_dist.planning.replay import (
    _CountingStore,
    _settle,
    epoch_row_order,
    replay_epochs,
    synthetic_manifest,
)
from tests.helpers import read_scalars, run_config

PAPER_PARAMETERS = 38_696_224
P = 24_448


@pytest.mark.parametrize("workers,world,rank", [(0, 1, 0), (2, 2, 1)])
def test_row_order_is_the_loaders(demo_shards, workers, world, rank):
    loader = ShardLoader(
        demo_shards,
        batch_size=4,
        rank=rank,
        world_size=world,
        num_workers=workers,
        shuffle_buffer=5,
    )
    for epoch in (0, 1):
        ids, _ = loader.plan(epoch)
        loaded = torch.cat([b.rows for b in loader.epoch_batches(epoch)]).tolist()
        order = epoch_row_order(loader.manifest, ids, workers, 5, 0, epoch, rank).tolist()
        assert order == loaded


def test_synthetic_manifest_is_what_make_shards_writes(demo_shards):
    real = load_manifest(demo_shards)
    made = synthetic_manifest(64, 8, 32)
    assert [(e["first_row"], e["count"]) for e in made["shards"]] == [
        (e["first_row"], e["count"]) for e in real["shards"]
    ]
    assert synthetic_manifest(10, 4, 32)["shards"][-1]["count"] == 2
    with pytest.raises(ValueError, match="--images and --samples-per-shard must be positive"):
        synthetic_manifest(0, 4, 32)


def test_gradient_reduction_arithmetic():
    fp32 = PAPER_PARAMETERS * 4
    assert fp32 == 154_784_896  # the paper's generator: ~155 MB of fp32 gradients
    assert ring_traffic_bytes(fp32, 1, 2) == 0
    assert ring_traffic_bytes(fp32, 32, 2) == pytest.approx(2 * 31 / 32 * fp32)
    assert ring_traffic_bytes(fp32, 32, 3) == pytest.approx(3 * 31 / 32 * fp32)
    assert gradient_itemsize({}) == 4
    assert gradient_itemsize({"bf16": {"enabled": True}}) == 2
    assert gradient_itemsize({"bf16": {"enabled": True}, "communication_data_type": "fp32"}) == 4

    # 10 images of 22 GFLOP (1/3 forward) at 100 TFLOP/s x 0.5 = 4.4 ms; 2 processes send
    # 1 x 8 MB = 64 Mbit at 16 Gbit/s = 4 ms.
    cost = ModelCost(2_000_000, 0, forward_flops=int(22e9 / 3), backward_flops=int(44e9 / 3))
    cluster = Cluster(
        gpus_per_node=2, accelerator_tflops=100, utilisation=0.5, interconnect_gbps=16
    )
    plain = inner_step_time(cost, 10, cluster, 4, 2, overlap=False)
    assert plain.compute_seconds == pytest.approx(4.4e-3)
    assert plain.comm_seconds == pytest.approx(4e-3)
    assert plain.seconds == pytest.approx(8.4e-3)
    assert plain.efficiency == pytest.approx(4.4 / 8.4)
    # Overlapped, the reduction hides behind the 2.93 ms backward pass: 1.07 ms exposed.
    hidden = inner_step_time(cost, 10, cluster, 4, 2, overlap=True)
    assert hidden.exposed_comm_seconds == pytest.approx(4e-3 - 44e9 / 3 * 10 / 50e12)
    assert inner_step_time(cost, 10, Cluster(), 4, 2, overlap=False).efficiency == 1.0


def _cfg(tmp_path, **sections):
    raw = {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "demo32"},
        "data": {"shards": "unused", "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8},
        "train": {"max_steps": 100, "inner_steps": 1},
        "store": {"rows_per_chunk": 4, "prefetch_chunks": 2},
        "checkpoint": {"every_steps": 0},
        "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw)


# A small generator on a fast cluster: nothing is wrong with the base plan.
COST = ModelCost(1_000_000, 1_000, forward_flops=int(1e9), backward_flops=int(2e9))
FAST = Cluster(store_mbps=1e6, checkpoint_mbps=1e6)


def _warnings(cfg, images=256, sps=16, cluster=FAST, cost=COST):
    manifest = synthetic_manifest(images, sps, cfg.model.image_size)
    return make_plan(cfg, manifest, "test", cluster, cost, 1.0, "test").warnings


def test_a_sound_plan_has_no_warnings(tmp_path):
    assert _warnings(_cfg(tmp_path)) == []


@pytest.mark.parametrize(
    "sections,kwargs,expected",
    [
        (
            {"store": {"cache_bytes": 1000}},
            {},
            "store.cache_bytes (1,000) is smaller than one chunk (391,168 bytes), so the run "
            "cannot start",
        ),
        (
            {"store": {"cache_bytes": 3 * 391_168}},
            {},
            "store.cache_bytes (1,173,504) is below the 1,564,672 bytes that the 4 chunks one "
            "batch may touch need",
        ),
        (
            {},
            {"cluster": Cluster(nodes=2, gpus_per_node=16)},
            "the 16 shards are fewer than the 32 processes, so the run cannot start",
        ),
        (
            {"data": {"num_workers": 4}},
            {"cluster": Cluster(gpus_per_node=8, store_mbps=1e6, checkpoint_mbps=1e6)},
            "the 16 shards are fewer than processes x data.num_workers (8 x 4)",
        ),
        (
            {
                "store": {"cache_bytes": 4 * 391_168, "prefetch_chunks": 64},
                "data": {"shuffle_buffer": 64},
            },
            {"sps": 64},
            "store.cache_bytes (1,564,672) makes chunks leave the cache before the epoch is done",
        ),
        (
            {"checkpoint": {"every_steps": 3}},
            {},
            "checkpoint.every_steps (3) writes back",
        ),
        (
            {},
            {"cluster": Cluster(gpus_per_node=8, interconnect_gbps=1, store_mbps=1e6)},
            "the generator's gradient reduction takes",
        ),
        ({}, {"cluster": Cluster(store_mbps=1)}, "the store must sustain"),
        ({}, {"cluster": Cluster(checkpoint_mbps=0.1)}, "longer than the 30 s a launcher waits"),
    ],
)
def test_each_warning(tmp_path, sections, kwargs, expected):
    warnings = _warnings(_cfg(tmp_path, **sections), **kwargs)
    assert len([w for w in warnings if expected in w]) == 1, warnings


PREDICTED_RUNS = [
    (8, {"prefetch_chunks": 2}),  # peak set by the shuffle window and the read-ahead
    (8, {"prefetch_chunks": 64, "cache_bytes": 5 * 4 * P * 4}),  # peak set by the budget
    # A shuffle window wider than the budget: chunks leave early, ~3.4x the traffic.
    (32, {"prefetch_chunks": 64, "cache_bytes": 4 * 4 * P * 4}),
]


@pytest.mark.parametrize("shuffle,store", PREDICTED_RUNS)
def test_predictions_match_a_real_run(tmp_path, demo_shards, shuffle, store, cli):
    """Two epochs in one process with checkpoints mid-epoch (each writes back partly trained
    chunks): bytes read and written and the cache's peak as the run logs them."""
    cfg_path = run_config(
        tmp_path,
        demo_shards,
        data={"num_workers": 2, "shuffle_buffer": shuffle},
        train={"max_steps": 32, "inner_steps": 1},  # 16 steps of 4 images per epoch
        store={"rows_per_chunk": 4, **store},
        checkpoint={"every_steps": 6},
        log={"every_steps": 8, "image_every_steps": 0},
    )
    proc = cli("plan", "--config", cfg_path, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    proc = cli("train", "--config", cfg_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = read_scalars(tmp_path / "run")
    measured = {t: acc.Scalars(f"store/{t}")[-1].value for t in ("bytes_read", "bytes_written")}
    predicted = {
        "bytes_read": plan["epoch0_bytes_read"] + plan["epoch_bytes_read"],
        "bytes_written": plan["epoch0_bytes_written"] + plan["epoch_bytes_written"],
    }
    assert measured["bytes_written"] > 2 * 64 * P * 4  # the checkpoints' write-backs count
    for key, value in predicted.items():
        assert value == pytest.approx(measured[key], rel=0.1), key
    peak = max(e.value for e in acc.Scalars("store/peak_resident_bytes"))
    assert plan["cache_peak_bytes"] == pytest.approx(peak, rel=0.1)
    folder = tmp_path / "run" / "checkpoints" / "step-00000032"
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert plan["checkpoint_bytes"] == pytest.approx(size, rel=0.1)


class _SlowStore(_CountingStore):
    """The replay's store, but reads and writes wait until the step waits for the cache or
    the test opens the gate: the slowest store that still keeps up with the batch (what it
    was given finishes during the next batch's compute)."""

    def __init__(self, num_rows: int, rows_per_chunk: int):
        super().__init__(num_rows, rows_per_chunk)
        self.gate = threading.Event()

    def read_chunk(self, chunk, abort=None):
        self.gate.wait()
        return super().read_chunk(chunk, abort)

    def write_chunk(self, chunk, data, abort=None):
        self.gate.wait()
        super().write_chunk(chunk, data, abort)


@pytest.mark.parametrize("shuffle,store", PREDICTED_RUNS)
def test_cache_peak_and_traffic_do_not_depend_on_io_speed(tmp_path, shuffle, store):
    """The cache driven through the replay's batches over a store that holds every read and
    write until the step waits for it or the next batch has been read: the same peak and
    traffic as the replay predicts with a store that keeps up at once."""
    cfg = _cfg(
        tmp_path,
        data={"shuffle_buffer": shuffle},
        store=store,
        checkpoint={"every_steps": 6},
    )
    manifest = synthetic_manifest(64, 8, cfg.model.image_size)
    predicted = replay_epochs(cfg, manifest, 1, 0, 4, P)

    d = cfg.data
    slow = _SlowStore(manifest["num_samples"], 4)
    # As the replay: one float per row, the budget in the chunks the real one admits; an I/O
    # thread per chunk that can be held at once, so held I/O never blocks other I/O.
    cache = WriteBackCache(
        slow, cfg.store.cache_bytes // (P * 4) * 4, 64, cfg.store.prefetch_chunks
    )
    waits = cache._wait

    def wait(began, chunk):  # the step waits for the store: it delivers
        slow.gate.set()
        waits(began, chunk)

    cache._wait = wait
    steps = steps_per_epoch(manifest, 1, d.batch_size)
    measured, step = [], 0
    for epoch in range(2):
        ids = shards_for_rank(len(manifest["shards"]), cfg.train.seed, epoch, 0, 1)
        order = epoch_row_order(
            manifest, ids, d.num_workers, d.shuffle_buffer, cfg.train.seed, epoch, 0
        )
        before = IOCounters(**vars(slow.counters))
        cache.peak_resident = 0
        cache.begin_epoch(chunk_need_order(manifest, ids, d.num_workers, 4))
        start = 0
        for size in batch_sizes(order.size, steps):
            rows = order[start : start + size]
            start += size
            step += 1
            values = cache.read_rows(rows)
            # The batch's compute: the store finishes what it was given so far, then holds
            # the write-backs and reads ahead that follow until the next batch has been read.
            slow.gate.set()
            _settle(cache)
            slow.gate.clear()
            cache.write_rows(rows, values)
            if step % cfg.checkpoint.every_steps == 0:
                cache.flush()
        cache.end_epoch()
        slow.written.update(range(64 // 4))  # every row trained: read from now on
        c = slow.counters
        measured.append(
            (
                (c.bytes_read - before.bytes_read) * P * 4,
                (c.bytes_written - before.bytes_written) * P * 4,
                cache.peak_resident // 4 * P * 4,
            )
        )
    cache.close()
    assert measured == [(e.bytes_read, e.bytes_written, e.peak_resident_bytes) for e in predicted]


def test_checkpoint_bytes_by_precision_and_optimizer(tmp_path):
    cost = ModelCost(1000, 10, 0, 0)
    plain = checkpoint_bytes(_cfg(tmp_path), cost, 1, 5)
    assert plain["engine weights"] == 4 * 1010 and plain["optimizer state"] == 0
    bf16 = _cfg(
        tmp_path,
        deepspeed={
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        },
    )
    files = checkpoint_bytes(bf16, cost, 1, 5)
    assert files["engine weights"] == 2 * 1010 and files["optimizer state"] == 8 * 1000


def _plan_on_32_gpus(cli, config: str) -> dict:
    args = ["--images", "1000000", "--nodes", "4", "--gpus-per-node", "8", "--json"]
    proc = cli("plan", "--config", config, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_plan_of_the_cluster_config_on_32_gpus(cli):
    plan = _plan_on_32_gpus(cli, "configs/big.json")
    cfg = load_config("configs/big.json")
    assert cfg.store.codec == "none" and plan["compression_ratio"] == 1.0
    assert plan["store_bytes"] == 2 * 1_000_000 * P * 4
    assert plan["steps_per_epoch"] == 250  # 32 shards of 1,000 for the largest share, by 128
    assert plan["gradient_bytes"] == PAPER_PARAMETERS * 2  # bf16 gradients
    # The paper's generator: 7.48 GFLOP forward per image; forward + backward ~3x.
    assert 3 * 7.48e9 < plan["flops_per_image"] < 3.3 * 7.53e9
    # What the shipped cluster config is for: the reduction hides behind the backward pass.
    assert plan["scaling_efficiency"] >= 0.8
    assert plan["warnings"] == []


def test_plan_of_the_papers_single_gpu_recipe_on_32_gpus_warns(cli):
    plan = _plan_on_32_gpus(cli, "configs/paper.json")
    assert plan["steps_per_epoch"] == 3200  # 32 shards of 1,000 for the largest share, by 10
    assert plan["gradient_bytes"] == PAPER_PARAMETERS * 4
    assert plan["scaling_efficiency"] < 0.1
    assert any("gradient reduction takes" in w for w in plan["warnings"])


def test_bad_arguments_are_one_line_errors(cli):
    proc = cli("plan", "--config", "configs/big.json", "--images", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --images and --samples-per-shard must be positive"


def test_batch_time_given_measured_or_computed(tmp_path):
    cfg = _cfg(tmp_path, train={"inner_steps": 5})
    manifest = synthetic_manifest(256, 16, cfg.model.image_size)

    def numbers(cluster, measured=None):
        plan = make_plan(cfg, manifest, "test", cluster, COST, 2.0, "test", measured)
        return plan.numbers

    computed = numbers(FAST)
    # 4 images x 3 GFLOP at 400 TFLOP/s x 0.4, one process: no reduction.
    assert computed["step_seconds"] == pytest.approx(5 * 4 * 3e9 / 160e12)
    assert numbers(FAST, (0.5, "measured"))["step_seconds"] == pytest.approx(5 * 0.5)
    given = numbers(Cluster(step_seconds=2.0, store_mbps=1e6, checkpoint_mbps=1e6))
    assert given["step_seconds"] == 2.0
    # The steady epoch's traffic, compressed 2x, over its 64 batches of 2 s.
    traffic = given["epoch_bytes_read"] + given["epoch_bytes_written"]
    assert traffic == 2 * 256 * P * 4  # each row once each way: no checkpoints, ample cache
    assert given["store_bytes_per_second"] == pytest.approx(traffic / 2.0 / (64 * 2.0))


def test_model_cost_of_the_paper_model():
    from lcm_dist.planning.cost import model_cost

    cost = model_cost(load_config("configs/big.json"))
    assert cost.generator_parameters == PAPER_PARAMETERS
    assert cost.generator_buffers == 12_736  # BatchNorm running means and variances
    # Forward: the generator's 7.48 GFLOP and the latent net's 0.05 (test_paper_model.py).
    assert round(cost.forward_flops / 1e9, 2) == 7.53
    # Backward: gradients of the inputs and the weights of every layer, ~2x the forward.
    assert 1.9 < cost.backward_flops / cost.forward_flops < 2.2


def test_compression_is_measured_with_the_configured_codec(tmp_path):
    import numpy as np

    from lcm_dist.latents.store import LatentStore
    from lcm_dist.planning.compression import compression_ratio, sample_rows

    cfg = _cfg(tmp_path)
    rows, note = sample_rows(cfg, 16)
    assert rows.shape == (16, P) and note.startswith("16 synthetic rows")
    assert compression_ratio(cfg, rows) == 1.0  # codec none: stored bytes are the logical ones
    zstd = _cfg(tmp_path, store={"codec": "zstd", "codec_level": 3})
    assert compression_ratio(zstd, np.zeros((16, P), dtype=np.float32)) > 100
    assert 1.0 < compression_ratio(zstd, rows) < 10
    # With committed rows in the run's store, those are measured instead.
    store = LatentStore.create(
        str(tmp_path / "run" / "latents.zarr"),
        num_rows=8,
        initial=rows[0],
        signature={"phi_size": P},
        rows_per_chunk=4,
    )
    store.write_chunk(1, np.full((4, P), 0.5, dtype=np.float32))
    store.commit()
    real, note = sample_rows(cfg, 16)
    assert note.startswith("4 committed rows of the run's store") and (real == 0.5).all()


def test_measured_step_time(tmp_path, demo_shards, cli):
    cfg_path = run_config(tmp_path, demo_shards)
    proc = cli("plan", "--config", cfg_path, "--measure")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 x (one inner step measured on " in proc.stdout  # its GPU, else its CPU


def test_synthetic_rows_compress_like_trained_ones(tmp_path, trained_run):
    from lcm_dist.latents.store import LatentStore
    from lcm_dist.planning.compression import compression_ratio, sample_rows

    trained = LatentStore.open(str(trained_run / "latents.zarr"), mode="r").read_rows(range(64))
    for codec in ("zstd", "blosc"):
        cfg = _cfg(tmp_path, model={"preset": "demo64"}, store={"codec": codec})
        synthetic, note = sample_rows(cfg, 64)
        assert "synthetic" in note
        real = compression_ratio(cfg, trained)
        assert compression_ratio(cfg, synthetic) == pytest.approx(real, rel=0.1), codec
