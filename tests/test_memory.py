"""malloc keeps the memory a CPU step frees, so the next step does not fault its pages in again."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

PROBE = """
import resource, statistics, torch
from lcm_dist.memory import keep_freed_memory

def faults_per_step():
    # A "step": tensors of a few sizes, written in full (every page touched), then freed.
    counts = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(4 * 2**20)
        x = torch.ones(16 * 2**20)
        y = a + 1
        del a, x, y
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts[6:])  # once the heap has grown to the step's needs

default = faults_per_step()
applied = keep_freed_memory()
print(default, applied, faults_per_step())
"""


def _probe(env_extra: dict) -> tuple[float, bool, float]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    env.pop("LCM_KEEP_FREED_MEMORY", None)
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), out[1] == "True", float(out[2])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_a_freed_step_is_reused_without_page_faults():
    default, applied, kept = _probe({})
    # 64 MiB is 16,384 pages: by default every step maps fresh ones (measured: 16,385 to
    # 24,577 a step); kept, the steps after the first few reuse them (measured: median 0).
    assert default > 10_000
    assert applied
    assert kept < 1_000


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_MAX_": "65536"}, {"LCM_KEEP_FREED_MEMORY": "0"}])
def test_malloc_settings_from_the_environment_win(env):
    default, applied, kept = _probe(env)
    assert not applied
    assert kept > 10_000


def test_an_accelerator_run_leaves_malloc_alone(monkeypatch):
    import lcm_dist.memory as memory

    monkeypatch.setattr(memory, "_applied", False)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: pytest.fail("malloc was touched"))
    assert memory.keep_freed_memory(torch.device("cuda")) is False
