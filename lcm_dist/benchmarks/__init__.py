"""Benchmarks behind ``python launch/bench.py NAME``: each returns one dict of measurements.

Ratios are measured within one run on the same machine, so a noisy shared host moves both
sides of a ratio together; absolute times are reported alongside for context.
"""

from __future__ import annotations

from collections.abc import Callable

from lcm_dist.benchmarks.fit import bench_fit
from lcm_dist.benchmarks.gpu import bench_gpu
from lcm_dist.benchmarks.latent import bench_latent
from lcm_dist.benchmarks.resume import bench_resume
from lcm_dist.benchmarks.scale import bench_scale
from lcm_dist.benchmarks.step import bench_step
from lcm_dist.benchmarks.store import bench_store
from lcm_dist.benchmarks.throughput import bench_throughput

BENCHMARKS: dict[str, Callable[..., dict]] = {
    "fit": bench_fit,
    "gpu": bench_gpu,
    "latent": bench_latent,
    "resume": bench_resume,
    "store": bench_store,
    "step": bench_step,
    "scale": bench_scale,
    "throughput": bench_throughput,
}
