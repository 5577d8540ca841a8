"""What a run will need, and whether it can work, before it starts (``launch/plan.py``).

Everything here is arithmetic on the config, the shards' manifest (real, or made up from a
number of images) and a few stated assumptions about the cluster, with three measured inputs:

* the store's traffic and the cache's peak come from replaying one process's first two epochs
  through the real ``WriteBackCache`` over a store stand-in that moves no data (the epoch plan,
  the loader's sample order and the checkpoint flushes are the run's own), so eviction under a
  small budget and the partly trained chunks a checkpoint writes back are counted, not guessed;
* the compression ratio comes from compressing a chunk of rows with the configured codec: real
  rows if the run's store exists, else the initial phi plus noise (see ``compression_ratio``);
* the generator's and latent nets' FLOPs per image come from ``torch.utils.flop_counter``.

Nothing here talks to other processes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from lcm_dist.cache import WriteBackCache, min_cache_bytes
from lcm_dist.config import RunConfig
from lcm_dist.data import batch_sizes, chunk_need_order, shards_for_rank, steps_per_epoch
from lcm_dist.latent_store import IOCounters, chunk_bounds, num_chunks, rows_per_chunk_for

PREEMPTION_SECONDS = 30.0
"""torchrun and DeepSpeed's launcher kill the training processes this long after SIGTERM."""


@dataclass(frozen=True)
class Cluster:
    """The cluster a run is planned for; the defaults are stated in every plan's output."""

    nodes: int = 1
    gpus_per_node: int = 1
    accelerator_tflops: float = 400.0
    """Dense bf16 peak of one accelerator, TFLOP/s (a current datacenter GPU: ~400-1000)."""
    utilisation: float = 0.4
    """Fraction of that peak the generator's convolutions reach."""
    interconnect_gbps: float = 100.0
    """Bandwidth of each process's slowest link in the gradient ring, Gbit/s."""
    store_mbps: float = 1000.0
    """Bandwidth of the latent store shared by all processes, MB/s."""
    checkpoint_mbps: float = 1000.0
    """Write bandwidth of the run folder's filesystem shared by all processes, MB/s."""
    step_seconds: float | None = None
    """Seconds per batch (all inner steps); None = computed from the FLOPs and links above."""

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


def synthetic_manifest(num_images: int, samples_per_shard: int, image_size: int) -> dict:
    """The manifest that ``launch/make_shards.py --samples-per-shard S`` writes for
    ``num_images`` images (shard bytes unknown)."""
    if num_images <= 0 or samples_per_shard <= 0:
        raise ValueError("--images and --samples-per-shard must be positive")
    shards = [
        {
            "name": f"shard-{k:06d}.tar",
            "first_row": first,
            "count": min(samples_per_shard, num_images - first),
        }
        for k, first in enumerate(range(0, num_images, samples_per_shard))
    ]
    return {
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "num_samples": num_images,
        "shards": shards,
    }


def epoch_row_order(
    manifest: dict,
    shard_ids: list[int],
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    rank: int,
) -> np.ndarray:
    """The rows one process trains in an epoch, in the order its ``ShardLoader`` yields them:
    each loader worker streams its shards (``shard_ids[w::W]``) block-shuffled in blocks of
    ``shuffle_buffer`` under ``(seed, epoch, rank, w)``, and the DataLoader takes one sample
    from each worker in turn, skipping workers that have run out."""
    workers = max(1, num_workers)
    block = max(1, shuffle_buffer)
    streams = []
    for w in range(workers):
        entries = [manifest["shards"][i] for i in shard_ids[w::workers]]
        rows = np.concatenate(
            [np.arange(e["first_row"], e["first_row"] + e["count"]) for e in entries]
            or [np.zeros(0, dtype=np.int64)]
        )
        rng = np.random.default_rng([seed, epoch, rank, w])
        parts = [rows[i : i + block] for i in range(0, rows.size, block)]
        streams.append([part[rng.permutation(part.size)] for part in parts])
    flat = [np.concatenate(s) if s else np.zeros(0, dtype=np.int64) for s in streams]
    order, position = [], [0] * workers
    while any(position[w] < flat[w].size for w in range(workers)):
        for w in range(workers):
            if position[w] < flat[w].size:
                order.append(flat[w][position[w]])
                position[w] += 1
    return np.asarray(order, dtype=np.int64)


class _CountingStore:
    """Stands in for a ``LatentStore`` under the real cache: one float per row and no data
    moved, only the traffic counted (chunks never written read as ``initial``, at no cost)."""

    def __init__(self, num_rows: int, rows_per_chunk: int):
        self.url = "(plan)"
        self.num_rows, self.rows_per_chunk, self.phi_size = num_rows, rows_per_chunk, 1
        self.stall_warning_seconds = 0.0
        self.last_error = None
        self.counters = IOCounters()
        self.written: set[int] = set()
        self._lock = threading.Lock()

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.rows_per_chunk, self.num_rows)

    def _rows(self, chunk: int) -> int:
        lo, hi = self.chunk_bounds(chunk)
        return hi - lo

    def read_chunk(self, chunk: int, abort=None) -> np.ndarray:
        with self._lock:
            if chunk in self.written:
                self.counters.bytes_read += self._rows(chunk)  # rows, scaled by the caller
                self.counters.chunk_reads += 1
        return np.zeros((self._rows(chunk), 1), dtype=np.float32)

    def write_chunk(self, chunk: int, data: np.ndarray, abort=None) -> None:
        with self._lock:
            self.written.add(chunk)
            self.counters.bytes_written += self._rows(chunk)
            self.counters.chunk_writes += 1


def _settle(cache: WriteBackCache) -> None:
    """Wait until the cache's background reads and writes are done: the store keeps up with
    the step, which the plan checks separately (store bandwidth)."""
    with cache._cond:
        while any(e.state != "ready" for e in cache._entries.values()):
            cache._cond.wait(timeout=1.0)


@dataclass
class EpochIO:
    """One process's latent store traffic in one epoch (logical bytes, as the run logs them)."""

    bytes_read: int
    bytes_written: int
    chunk_reads: int
    chunk_writes: int
    checkpoint_bytes_written: int
    """Of ``bytes_written``: partly trained chunks written back by checkpoints."""
    checkpoint_flush_max_bytes: int
    """The most that one checkpoint wrote back."""
    peak_resident_bytes: int


def replay_epochs(
    cfg: RunConfig,
    manifest: dict,
    world: int,
    rank: int,
    rows_per_chunk: int,
    phi_size: int,
    epochs: int = 2,
) -> list[EpochIO]:
    """One process's store traffic and cache peak in the first ``epochs`` epochs, from the real
    cache replaying the run's batches (checkpoint flushes included). Bytes are logical: rows x
    P x the storage itemsize for traffic, float32 for the cache (as the run counts them)."""
    d = cfg.data
    store = _CountingStore(manifest["num_samples"], rows_per_chunk)
    row_bytes = phi_size * 4
    # The cache measures its budget in float32 rows; with one float per row, a budget of
    # floor(cache_bytes / row_bytes) rows admits exactly the chunks the real one admits.
    budget = cfg.store.cache_bytes // row_bytes * 4
    cache = WriteBackCache(store, budget, cfg.store.io_threads, cfg.store.prefetch_chunks)
    steps = steps_per_epoch(manifest, world, d.batch_size)
    itemsize = np.dtype(cfg.store.dtype).itemsize
    results, step = [], 0
    try:
        for epoch in range(epochs):
            ids = shards_for_rank(len(manifest["shards"]), cfg.train.seed, epoch, rank, world)
            order = epoch_row_order(
                manifest, ids, d.num_workers, d.shuffle_buffer, cfg.train.seed, epoch, rank
            )
            before = IOCounters(**vars(store.counters))
            cache.peak_resident = 0
            cache.begin_epoch(chunk_need_order(manifest, ids, d.num_workers, rows_per_chunk))
            flushed, flush_max, start = 0, 0, 0
            for size in batch_sizes(order.size, steps):
                rows = order[start : start + size]
                start += size
                step += 1
                values = cache.read_rows(rows)
                cache.write_rows(rows, values)
                _settle(cache)
                every = cfg.checkpoint.every_steps
                if every and step % every == 0:
                    # A checkpoint writes back the chunks the epoch is still working on.
                    with cache._cond:
                        dirty = sum(
                            e.nbytes // 4
                            for e in cache._entries.values()
                            if e.state == "ready" and e.dirty
                        )
                    cache.flush()
                    flushed, flush_max = flushed + dirty, max(flush_max, dirty)
            cache.end_epoch()
            # Every row has now been trained by some process: from the next epoch on, every
            # chunk this process needs is read from the store.
            store.written.update(range(num_chunks(store.num_rows, rows_per_chunk)))
            c = store.counters
            results.append(
                EpochIO(
                    bytes_read=(c.bytes_read - before.bytes_read) * phi_size * itemsize,
                    bytes_written=(c.bytes_written - before.bytes_written) * phi_size * itemsize,
                    chunk_reads=c.chunk_reads - before.chunk_reads,
                    chunk_writes=c.chunk_writes - before.chunk_writes,
                    checkpoint_bytes_written=flushed * phi_size * itemsize,
                    checkpoint_flush_max_bytes=flush_max * phi_size * itemsize,
                    peak_resident_bytes=cache.peak_resident // 4 * row_bytes,
                )
            )
    finally:
        cache.close()
    return results


def sample_rows(cfg: RunConfig, count: int) -> tuple[np.ndarray, str]:
    """Up to ``count`` rows to measure compression on, and where they came from: the run's
    store if it has committed chunks, else the initial phi plus Gaussian noise of standard
    deviation ``model.clamp`` / 2 (trained conv weights spread over the clamp range), with the
    conv weights clamped as training clamps them."""
    import torch

    from lcm_dist.latent_net import initial_phi, phi_layout
    from lcm_dist.latent_store import LatentStore, resolve_url

    url = resolve_url(cfg)
    if not cfg.store.in_ram:
        try:
            if LatentStore.exists(url, cfg.store.storage_options):
                store = LatentStore.open(url, storage_options=cfg.store.storage_options, mode="r")
                parts, have = [], 0
                for chunk in np.nonzero(store.committed >= 0)[0].tolist():
                    if have >= count:
                        break
                    parts.append(store.read_chunk(chunk)[: count - have])
                    have += parts[-1].shape[0]
                if parts:
                    data = np.concatenate(parts)
                    return data, f"{have} committed rows of the run's store {url}"
        except (ValueError, OSError):
            pass  # no readable store: synthetic rows
    initial = initial_phi(cfg.model)
    noise = torch.randn(count, initial.numel(), generator=torch.Generator().manual_seed(0))
    rows = initial + noise * (cfg.model.clamp / 2)
    mask = phi_layout(cfg.model).clamp_mask()
    rows[:, mask] = rows[:, mask].clamp(-cfg.model.clamp, cfg.model.clamp)
    return rows.numpy(), (
        f"{count} synthetic rows: the initial phi plus Gaussian noise of std model.clamp/2, "
        "conv weights clamped"
    )


def compression_ratio(cfg: RunConfig, rows: np.ndarray) -> float:
    """Logical / stored bytes of ``rows`` written as one chunk of a store with the configured
    codec, level and dtype (an in-memory Zarr store, so the codec path is the run's own)."""
    import uuid

    import fsspec

    from lcm_dist.latent_store import LatentStore

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


@dataclass(frozen=True)
class ModelCost:
    """What one image costs in one inner step (forward and backward), counted by
    ``torch.utils.flop_counter``, and the generator's size."""

    generator_parameters: int
    generator_buffers: int
    forward_flops: int
    """Latent net and generator forward, per image."""
    backward_flops: int
    """Their backward (gradients for phi, theta and every activation), per image."""


def model_cost(cfg: RunConfig) -> ModelCost:
    """Counts the FLOPs of one image's inner step: the generator on the meta device (nothing
    computed), the latent net on the CPU (a few MFLOP)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lcm_dist.generator import Generator, count_parameters
    from lcm_dist.latent_net import BatchedLatentNet, initial_phi

    m = cfg.model
    side = m.noise_size - 2 * len(m.latent_widths)
    net = BatchedLatentNet(m)
    phi = initial_phi(m)[None].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fwd_net:
        z = net(phi)
    with FlopCounterMode(display=False) as bwd_net:
        z.sum().backward()
    with torch.device("meta"):
        gen = Generator(m)
        # Two images: BatchNorm in training mode needs more than one value per channel.
        z = torch.zeros(2, m.latent_widths[-1], side, side, requires_grad=True)
    with FlopCounterMode(display=False) as fwd_gen:
        out = gen(z)
    with FlopCounterMode(display=False) as bwd_gen:
        out.sum().backward()
    return ModelCost(
        generator_parameters=count_parameters(gen),
        generator_buffers=sum(b.numel() for b in gen.buffers() if b.is_floating_point()),
        forward_flops=fwd_net.get_total_flops() + fwd_gen.get_total_flops() // 2,
        backward_flops=bwd_net.get_total_flops() + bwd_gen.get_total_flops() // 2,
    )


def gradient_itemsize(ds: dict) -> int:
    """Bytes per gradient element DeepSpeed reduces: ``communication_data_type`` if set, else
    the generator's dtype (bf16 with ``deepspeed.bf16``, else fp32)."""
    comm = ds.get("communication_data_type")
    if comm:
        return 4 if str(comm).lower() in ("fp32", "float32") else 2
    return 2 if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") else 4


def ring_traffic_bytes(payload: int, processes: int, zero_stage: int) -> float:
    """Bytes each process sends per inner step to reduce the gradients over ``processes``:
    a ring all-reduce (or ZeRO 1-2's reduce-scatter plus all-gather) moves 2 (P-1)/P of the
    payload; ZeRO-3 gathers the parameters once more for the backward pass: 3 (P-1)/P."""
    if processes <= 1:
        return 0.0
    return (3 if zero_stage == 3 else 2) * (processes - 1) / processes * payload


@dataclass(frozen=True)
class StepTime:
    """One inner step of one process: compute, gradient communication and what is exposed."""

    compute_seconds: float
    comm_seconds: float
    exposed_comm_seconds: float

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.exposed_comm_seconds

    @property
    def efficiency(self) -> float:
        """Scaling efficiency: the share of the step spent computing."""
        return self.compute_seconds / self.seconds


def inner_step_time(
    cost: ModelCost,
    batch_size: int,
    cluster: Cluster,
    grad_itemsize: int,
    zero_stage: int,
    overlap: bool,
) -> StepTime:
    """Compute at the cluster's sustained FLOP/s, plus the gradient reduction at its link
    bandwidth; with ``overlap`` the reduction runs during the backward pass and only what
    outlasts it is exposed."""
    flops = (cost.forward_flops + cost.backward_flops) * batch_size
    rate = cluster.accelerator_tflops * 1e12 * cluster.utilisation
    compute = flops / rate
    backward = cost.backward_flops * batch_size / rate
    payload = cost.generator_parameters * grad_itemsize
    traffic = ring_traffic_bytes(payload, cluster.processes, zero_stage)
    comm = traffic * 8 / (cluster.interconnect_gbps * 1e9)
    exposed = max(0.0, comm - backward) if overlap else comm
    return StepTime(compute, comm, exposed)


def checkpoint_bytes(cfg: RunConfig, cost: ModelCost, processes: int, chunks: int) -> dict:
    """Bytes of one checkpoint folder by file kind: the generator's fp32 weights
    (generator.safetensors), DeepSpeed's module weights in the generator's dtype, its optimizer
    state (an fp32 master copy under ZeRO >= 1 or bf16, plus SGD momentum or Adam's two
    moments), each process's RNG and BatchNorm statistics, and the slot table."""
    ds = cfg.deepspeed
    p, buffers = cost.generator_parameters, cost.generator_buffers
    bf16 = isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    opt = ds["optimizer"]
    kind, params = opt["type"].lower(), opt.get("params", {})
    per_param = 8 if "adam" in kind else 4 if params.get("momentum", 0) else 0
    master = 4 if (stage >= 1 or bf16) else 0
    return {
        "generator.safetensors": 4 * (p + buffers),
        "engine weights": (2 if bf16 else 4) * (p + buffers),
        "optimizer state": (master + per_param) * p,
        "RNG and BatchNorm statistics": processes * (4 * buffers + 6_000),
        "slot table": chunks,
    }


@dataclass
class Plan:
    """A run's needs: every number the plan prints, and its warnings."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    """(heading or label, value); a label of "" starts a new section named by value."""
    warnings: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    """The main predictions, by name (for tests and --json)."""

    def section(self, title: str) -> None:
        self.lines.append(("", title))

    def add(self, label: str, value: str) -> None:
        self.lines.append((label, value))

    def text(self) -> str:
        width = max((len(label) for label, _ in self.lines if label), default=0)
        out = []
        for label, value in self.lines:
            if label:
                out.append(f"  {label:<{width}}  {value}")
            else:
                out.append(("\n" if out else "") + value)
        out.append("\nwarnings:" if self.warnings else "\nwarnings: none")
        out.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(out)


def _b(n: float) -> str:
    """Bytes in decimal units (GB = 1e9 bytes)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _t(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def make_plan(
    cfg: RunConfig,
    manifest: dict,
    dataset_note: str,
    cluster: Cluster,
    cost: ModelCost,
    ratio: float,
    ratio_note: str,
    step_note: str = "",
) -> Plan:
    """The plan of ``cfg`` on ``cluster`` for the dataset ``manifest``; ``cost`` and ``ratio``
    are measured by ``model_cost`` and ``compression_ratio``."""
    from lcm_dist.latent_net import phi_layout

    plan = Plan()
    d, st, ds = cfg.data, cfg.store, cfg.deepspeed
    world = cluster.processes
    n, sps = manifest["num_samples"], manifest["samples_per_shard"]
    shards = len(manifest["shards"])
    phi = phi_layout(cfg.model).size
    itemsize = np.dtype(st.dtype).itemsize
    rows = rows_per_chunk_for(cfg, sps)
    chunk_bytes = rows * phi * 4  # in the cache (float32)
    chunks = num_chunks(n, rows)
    steps = steps_per_epoch(manifest, world, d.batch_size) if shards >= world else 0
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    overlap = bool(zero.get("overlap_comm")) and stage >= 1
    grad_itemsize = gradient_itemsize(ds)

    plan.section(f"dataset: {dataset_note}")
    plan.add("images", f"{n:,} in {shards:,} shards of {sps:,}")
    plan.add("processes", f"{world} ({cluster.nodes} node(s) x {cluster.gpus_per_node})")
    plan.add("batch", f"{d.batch_size} images per process, {cfg.train.inner_steps} inner steps")
    if steps:
        plan.add("steps per epoch", f"{steps:,} (global batch {world * d.batch_size:,})")
    plan.numbers.update(steps_per_epoch=steps, rows_per_chunk=rows)

    # The latent store.
    logical = n * phi * itemsize
    plan.section("latent store")
    plan.add("phi", f"{phi:,} x {st.dtype} = {_b(phi * itemsize)} per image")
    plan.add(
        "chunks",
        f"{chunks:,} of {rows} rows ({_b(rows * phi * itemsize)} as stored, "
        f"{_b(chunk_bytes)} in the cache)",
    )
    plan.add("compression", f"{ratio:.2f}x with codec {st.codec} ({ratio_note})")
    plan.add(
        "size",
        f"{_b(2 * logical / ratio)} on the store for both slots "
        f"({_b(logical)} of phi per slot before compression)",
    )
    plan.numbers.update(store_bytes=2 * logical / ratio, compression_ratio=ratio)

    # One process's cache and traffic, replayed.
    need_chunks, need_bytes = min_cache_bytes(d, rows, phi)
    plan.section("per process: cache and store traffic (process 0, replayed epochs 0 and 1)")
    plan.add("cache budget", f"{_b(st.cache_bytes)} (store.cache_bytes)")
    plan.add("least budget", f"{_b(need_bytes)}: the {need_chunks} chunks one batch may touch")
    if chunk_bytes > st.cache_bytes:
        plan.warnings.append(
            f"store.cache_bytes ({st.cache_bytes:,}) is smaller than one chunk "
            f"({chunk_bytes:,} bytes), so the run cannot start; raise it or lower "
            "store.rows_per_chunk"
        )
    elif st.cache_bytes < need_bytes:
        plan.warnings.append(
            f"store.cache_bytes ({st.cache_bytes:,}) is below the {need_bytes:,} bytes that the "
            f"{need_chunks} chunks one batch may touch need, so the run stops at its start; "
            f"raise it to at least {need_bytes:,}"
        )
    if shards < world:
        plan.warnings.append(
            f"the {shards} shards are fewer than the {world} processes, so the run cannot start; "
            f"make the shards with --samples-per-shard at most {n // world:,}"
        )
        return plan
    if shards < world * max(1, d.num_workers):
        plan.warnings.append(
            f"the {shards} shards are fewer than processes x data.num_workers "
            f"({world} x {d.num_workers}), so some loader workers get no shard; make the shards "
            f"with --samples-per-shard at most {n // (world * max(1, d.num_workers)):,} or lower "
            "data.num_workers"
        )
    if st.cache_bytes < need_bytes or chunk_bytes > st.cache_bytes:
        return plan
    first, steady = replay_epochs(cfg, manifest, world, 0, rows, phi)
    own = sum(
        manifest["shards"][i]["count"] for i in shards_for_rank(shards, cfg.train.seed, 1, 0, world)
    )
    plan.add("cache peak", f"{_b(steady.peak_resident_bytes)}")
    for name, e in (("epoch 0", first), ("epoch 1+", steady)):
        plan.add(
            name,
            f"read {_b(e.bytes_read)}, written {_b(e.bytes_written)} "
            f"(of which {_b(e.checkpoint_bytes_written)} by checkpoints)",
        )
    amplification = (steady.bytes_read + steady.bytes_written) / (2 * own * phi * itemsize)
    plan.add("I/O amplification", f"{amplification:.2f} (epoch 1+; 1.00 = each row once each way)")
    plan.numbers.update(
        cache_peak_bytes=max(first.peak_resident_bytes, steady.peak_resident_bytes),
        epoch0_bytes_read=first.bytes_read,
        epoch0_bytes_written=first.bytes_written,
        epoch_bytes_read=steady.bytes_read,
        epoch_bytes_written=steady.bytes_written,
        io_amplification=amplification,
    )
    evicted = steady.bytes_written - steady.checkpoint_bytes_written - own * phi * itemsize
    if evicted > 0.05 * own * phi * itemsize:
        plan.warnings.append(
            f"store.cache_bytes ({st.cache_bytes:,}) makes chunks leave the cache before the "
            f"epoch is done with them ({amplification:.2f}x the store traffic); raise it or "
            "lower data.shuffle_buffer"
        )
    if steady.checkpoint_bytes_written > 0.25 * own * phi * itemsize:
        plan.warnings.append(
            f"checkpoint.every_steps ({cfg.checkpoint.every_steps}) writes back "
            f"{_b(steady.checkpoint_bytes_written)} of partly trained chunks per process per "
            "epoch; checkpoint less often or lower data.shuffle_buffer"
        )

    # Step time: compute and the generator's gradient reduction.
    t = inner_step_time(cost, d.batch_size, cluster, grad_itemsize, stage, overlap)
    payload = cost.generator_parameters * grad_itemsize
    per_image = cost.forward_flops + cost.backward_flops
    plan.section("generator: compute and gradient reduction per inner step, per process")
    plan.add(
        "compute",
        f"{per_image * d.batch_size / 1e9:,.1f} GFLOP ({d.batch_size} x "
        f"{per_image / 1e9:.2f} GFLOP forward+backward) = {_t(t.compute_seconds)} at "
        f"{cluster.accelerator_tflops:g} TFLOP/s x {cluster.utilisation:.0%}",
    )
    plan.add(
        "gradients",
        f"{cost.generator_parameters:,} x {grad_itemsize} bytes = {_b(payload)}; "
        f"{_b(ring_traffic_bytes(payload, world, stage))} sent per process "
        f"(ring over {world}, ZeRO stage {stage}) = {_t(t.comm_seconds)} at "
        f"{cluster.interconnect_gbps:g} Gbit/s",
    )
    plan.add(
        "inner step",
        f"{_t(t.seconds)} ({_t(t.exposed_comm_seconds)} of it waiting on the reduction"
        + (", overlapped with the backward pass)" if overlap else ", not overlapped)"),
    )
    plan.add("scaling efficiency", f"{t.efficiency:.0%} (compute / inner step)")
    options = []
    for label, batch, item, ovl in (
        (f"data.batch_size {2 * d.batch_size}", 2 * d.batch_size, grad_itemsize, overlap),
        (f"data.batch_size {8 * d.batch_size}", 8 * d.batch_size, grad_itemsize, overlap),
        ("bf16 gradients", d.batch_size, 2, overlap),
        ("overlap_comm (ZeRO >= 1)", d.batch_size, grad_itemsize, True),
        (f"batch {8 * d.batch_size}, bf16 gradients, overlapped", 8 * d.batch_size, 2, True),
    ):
        if (item, ovl) == (grad_itemsize, overlap) and batch == d.batch_size:
            continue
        other = inner_step_time(cost, batch, cluster, item, max(stage, 1) if ovl else stage, ovl)
        options.append(f"{label}: {other.efficiency:.0%}")
    if world > 1:
        plan.add("raised by", "; ".join(options))
    plan.numbers.update(
        inner_step_seconds=t.seconds,
        scaling_efficiency=t.efficiency,
        gradient_bytes=payload,
        flops_per_image=per_image,
    )
    if world > 1 and t.efficiency < 0.5:
        plan.warnings.append(
            f"the generator's gradient reduction takes {t.comm_seconds / t.compute_seconds:.1f}x "
            f"its compute per inner step (scaling efficiency {t.efficiency:.0%}); raise "
            "data.batch_size, enable deepspeed.bf16, or train on fewer processes"
        )

    # The step time the store must keep up with.
    step_seconds = cluster.step_seconds or cfg.train.inner_steps * t.seconds
    note = step_note or (
        "given" if cluster.step_seconds else f"{cfg.train.inner_steps} x the inner step above"
    )
    plan.section("store bandwidth (epoch 1+, compressed bytes on the wire)")
    plan.add("batch", f"{_t(step_seconds)} ({note})")
    per_process = (steady.bytes_read + steady.bytes_written) / ratio / (steps * step_seconds)
    plan.add("per process", f"{_b(per_process)}/s")
    plan.add(
        "all processes",
        f"{_b(per_process * world)}/s against the store's {cluster.store_mbps:g} MB/s",
    )
    epoch_seconds = steps * step_seconds
    plan.add(
        "epoch", f"{_t(epoch_seconds)}; train.max_steps = {cfg.train.max_steps / steps:.1f} epochs"
    )
    plan.numbers.update(store_bytes_per_second=per_process * world, step_seconds=step_seconds)
    if per_process * world > cluster.store_mbps * 1e6:
        plan.warnings.append(
            f"the store must sustain {_b(per_process * world)}/s for all processes but gives "
            f"{cluster.store_mbps:g} MB/s (--store-mbps), so steps will wait on it; use a faster "
            "store, store.dtype float16 or a compressing store.codec"
        )

    # Checkpoints.
    files = checkpoint_bytes(cfg, cost, world, chunks)
    total = sum(files.values())
    flush = max(first.checkpoint_flush_max_bytes, steady.checkpoint_flush_max_bytes)
    flush = flush * world / ratio
    seconds = total / (cluster.checkpoint_mbps * 1e6) + flush / (cluster.store_mbps * 1e6)
    plan.section("checkpoint")
    plan.add("size", f"{_b(total)} (" + ", ".join(f"{k} {_b(v)}" for k, v in files.items()) + ")")
    plan.add(
        "latents flushed",
        f"up to {_b(flush)} of partly trained chunks (all processes, as process 0 replayed)",
    )
    plan.add(
        "time",
        f"{_t(seconds)} at {cluster.checkpoint_mbps:g} MB/s (run folder) and "
        f"{cluster.store_mbps:g} MB/s (store)",
    )
    plan.numbers.update(checkpoint_bytes=total, checkpoint_seconds=seconds)
    if seconds > PREEMPTION_SECONDS:
        plan.warnings.append(
            f"a checkpoint takes {_t(seconds)}, longer than the {PREEMPTION_SECONDS:.0f} s a "
            "launcher waits after SIGTERM, so a preempted run loses its last batches; give the "
            "run folder more bandwidth or use ZeRO stage >= 1 with fewer optimizer states"
        )
    return plan


def assumptions_text(cluster: Cluster) -> str:
    """The cluster assumptions a plan rests on, for its header."""
    return (
        f"assumed: {cluster.accelerator_tflops:g} TFLOP/s per accelerator at "
        f"{cluster.utilisation:.0%} utilisation, {cluster.interconnect_gbps:g} Gbit/s per "
        f"process for gradients, store {cluster.store_mbps:g} MB/s and run folder "
        f"{cluster.checkpoint_mbps:g} MB/s shared by all processes"
    )


def measure_inner_step(cfg: RunConfig, repeats: int = 3) -> tuple[float, str]:
    """Seconds of one inner step (latent nets and generator forward and backward, SGD on both)
    at ``data.batch_size`` on this machine's first GPU or its CPU, the best of ``repeats``
    after one warm-up, and what it ran on; one process, no gradient reduction."""
    import time

    import torch

    from lcm_dist.generator import Generator
    from lcm_dist.latent_net import BatchedLatentNet, initial_phi
    from lcm_dist.loss import lcm_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m, b = cfg.model, cfg.data.batch_size
    net, gen = BatchedLatentNet(m).to(device), Generator(m).to(device)
    phi = initial_phi(m).to(device).repeat(b, 1).requires_grad_(True)
    images = torch.rand(b, m.image_channels, m.image_size, m.image_size, device=device)
    optimizer = torch.optim.SGD(gen.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = lcm_loss(gen(net(phi)), images, cfg.train.lap_levels, cfg.train.mse_weight)
        loss["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            phi -= 1e-3 * phi.grad
            phi.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "this machine's CPU"
    return min(times[1:]), f"one inner step measured on {name}: {_t(min(times[1:]))}"
