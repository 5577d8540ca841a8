"""What a run will need, and whether it can work, before it starts (``launch/plan.py``).

Everything here is arithmetic on the config, the shards' manifest (real, or made up from a
number of images) and a few stated assumptions about the cluster, with three measured inputs:

* the store's traffic and the cache's peak come from replaying one process's first two epochs
  through the real cache (``lcm_dist.planning.replay``; a long epoch's first batches, scaled);
* the compression ratio comes from compressing rows with the configured codec: real rows if
  the run's store exists, else the initial phi plus noise (``lcm_dist.planning.compression``);
* the FLOPs of an inner step come from ``torch.utils.flop_counter`` (``lcm_dist.planning.cost``).

Nothing here talks to other processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lcm_dist.config import RunConfig
from lcm_dist.data.plan import shards_for_rank, steps_per_epoch
from lcm_dist.latents.layout import is_object_store, min_cache_bytes, num_chunks
from lcm_dist.latents.run_store import resolve_url, rows_per_chunk_for
from lcm_dist.planning.cost import (
    Cluster,
    ModelCost,
    checkpoint_bytes,
    gradient_itemsize,
    inner_step_time,
    ring_traffic_bytes,
)
from lcm_dist.planning.object_store import (
    StorePrices,
    StoreTraffic,
    add_object_store_section,
)
from lcm_dist.planning.replay import replay_epochs, window_steps
from lcm_dist.planning.units import fmt_bytes as _b
from lcm_dist.planning.units import fmt_seconds as _t

PREEMPTION_SECONDS = 30.0
"""torchrun and DeepSpeed's launcher kill the training processes this long after SIGTERM."""


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


def make_plan(
    cfg: RunConfig,
    manifest: dict,
    dataset_note: str,
    cluster: Cluster,
    cost: ModelCost,
    ratio: float,
    ratio_note: str,
    measured: tuple[float, str] | None = None,
    prices: StorePrices | None = None,
) -> Plan:
    """The plan of ``cfg`` on ``cluster`` for the dataset ``manifest``; ``cost`` and ``ratio``
    are measured by ``model_cost`` and ``compression_ratio``; ``measured``, from
    ``measure_inner_step``, replaces the computed compute time of an inner step; ``prices``
    are the object store's (default: S3 Standard's)."""
    from lcm_dist.model.latent_net import phi_layout

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
    window = window_steps(steps, d.batch_size, d.num_workers, sps) if steps else 0
    how = "replayed" if window == steps else f"{window:,} of {steps:,} batches replayed, scaled"
    plan.section(f"per process: cache and store traffic (process 0, epochs 0 and 1, {how})")
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
    elif shards < world * max(1, d.num_workers):
        plan.warnings.append(
            f"the {shards} shards are fewer than processes x data.num_workers "
            f"({world} x {d.num_workers}), so some loader workers get no shard; make the shards "
            f"with --samples-per-shard at most {n // (world * max(1, d.num_workers)):,} or lower "
            "data.num_workers"
        )
    # The rest of this section, the store's bandwidth and the checkpoint's latents need the
    # replay, which needs a run that can start.
    replayed = shards >= world and chunk_bytes <= st.cache_bytes and st.cache_bytes >= need_bytes
    first = steady = None
    if replayed:
        first, steady = replay_epochs(cfg, manifest, world, 0, rows, phi)
        own = sum(
            manifest["shards"][i]["count"]
            for i in shards_for_rank(shards, cfg.train.seed, 1, 0, world)
        )
        peak = max(first.peak_resident_bytes, steady.peak_resident_bytes)
        plan.add("cache peak", f"{_b(peak)}")
        for name, e in (("epoch 0", first), ("epoch 1+", steady)):
            plan.add(
                name,
                f"read {_b(e.bytes_read)}, written {_b(e.bytes_written)} "
                f"(of which {_b(e.checkpoint_bytes_written)} by checkpoints)",
            )
        amplification = (steady.bytes_read + steady.bytes_written) / (2 * own * phi * itemsize)
        plan.add(
            "I/O amplification", f"{amplification:.2f} (epoch 1+; 1.00 = each row once each way)"
        )
        plan.numbers.update(
            cache_peak_bytes=peak,
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
            "data.batch_size"
            + (", enable deepspeed.bf16" if grad_itemsize == 4 else "")
            + (", set deepspeed.zero_optimization.overlap_comm" if not overlap else "")
            + " or train on fewer processes"
        )

    # The step time the store must keep up with.
    if cluster.step_seconds:
        step_seconds, note = cluster.step_seconds, "given"
    elif measured:
        step_seconds = cfg.train.inner_steps * (measured[0] + t.exposed_comm_seconds)
        note = f"{cfg.train.inner_steps} x ({measured[1]}, plus the exposed reduction above)"
    else:
        step_seconds = cfg.train.inner_steps * t.seconds
        note = f"{cfg.train.inner_steps} x the inner step above"
    if replayed:
        plan.section("store bandwidth (epoch 1+, compressed bytes on the wire)")
        plan.add("batch", f"{_t(step_seconds)} ({note})")
        per_process = (steady.bytes_read + steady.bytes_written) / ratio / (steps * step_seconds)
        plan.add("per process", f"{_b(per_process)}/s")
        plan.add(
            "all processes",
            f"{_b(per_process * world)}/s against the store's {cluster.store_mbps:g} MB/s",
        )
        # A manifest of real shards has their bytes (a synthetic one, of any length, has none).
        shard_bytes = (
            [e.get("bytes", 0) for e in manifest["shards"]]
            if "bytes" in manifest["shards"][0]
            else [0]
        )
        if all(shard_bytes):
            images = sum(shard_bytes) / n * d.batch_size / step_seconds
            plan.add("shards", f"{_b(images)}/s of images per process (shard bytes / image)")
        epoch_seconds = steps * step_seconds
        plan.add("epoch", f"{_t(epoch_seconds)} ({steps:,} batches)")
        plan.add(
            "run",
            f"{_t(cfg.train.max_steps * step_seconds)} for train.max_steps "
            f"{cfg.train.max_steps:,} ({cfg.train.max_steps / steps:.1f} epochs)",
        )
        plan.numbers.update(store_bytes_per_second=per_process * world, step_seconds=step_seconds)
        if per_process * world > cluster.store_mbps * 1e6:
            plan.warnings.append(
                f"the store must sustain {_b(per_process * world)}/s for all processes but gives "
                f"{cluster.store_mbps:g} MB/s (--store-mbps), so steps will wait on it; use a faster "
                "store, store.dtype float16 or a compressing store.codec"
            )

    # The store's objects, requests and their cost.
    traffic = None
    if replayed:
        traffic = StoreTraffic(
            chunk_reads=steady.chunk_reads,
            chunk_writes=steady.chunk_writes,
            bytes_moved=(steady.bytes_read + steady.bytes_written) / ratio,
            epoch_seconds=steps * step_seconds,
        )
    fixes = f"store.rows_per_chunk above {rows} (a divisor of the shards' {sps:,} samples; "
    fixes += "the cache's least budget grows with it)"
    if st.dtype == "float32" and not st.rows_per_chunk:
        fixes += ", store.dtype float16 (twice the rows in an automatic chunk)"
    fixes += " or shards of more samples (make_shards.py --samples-per-shard)"
    add_object_store_section(
        plan,
        prices or StorePrices(),
        chunks=chunks,
        stored_chunk_bytes=rows * phi * itemsize / ratio,
        stored_bytes=2 * logical / ratio,
        export_bytes=logical / ratio + n * phi * 4,
        store_mbps=cluster.store_mbps,
        world=world,
        gpus_per_node=cluster.gpus_per_node,
        traffic=traffic,
        fixes=fixes,
        object_store=is_object_store(resolve_url(cfg)),
    )

    # Checkpoints.
    files = checkpoint_bytes(cfg, cost, world, chunks)
    total = sum(files.values())
    flush = max(first.dirty_peak_bytes, steady.dirty_peak_bytes) * world / ratio if replayed else 0
    seconds = total / (cluster.checkpoint_mbps * 1e6) + flush / (cluster.store_mbps * 1e6)
    plan.section("checkpoint")
    plan.add("size", f"{_b(total)} (" + ", ".join(f"{k} {_b(v)}" for k, v in files.items()) + ")")
    if replayed:
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
            "launcher waits after SIGTERM, so a preempted run is killed before it commits (and "
            "resumes from the commit before); give the run folder and the store more bandwidth "
            "or lower data.shuffle_buffer (fewer partly trained chunks to write back)"
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
