"""Host memory for compute on the CPU: keep what a step frees for the next step.

A training step on the CPU allocates and frees the same activation and gradient tensors every
step, many of them megabytes large. glibc's malloc serves large blocks with ``mmap`` and gives
them back to the kernel on ``free``, so the next step's tensors land on fresh pages and every
4 KiB page costs a page fault on first touch: measured here, 40,000-80,000 faults per demo64
step at 4 inner steps, about a quarter of the step's time. Telling malloc to keep freed memory
(no ``mmap`` for large blocks, no trimming of the heap's top) makes the step reuse its pages:
~0 faults, the step 25% faster, for about 130 MB more resident memory that stays flat over a
run (``python launch/bench.py step`` runs with it; ``docs/benchmarks.md`` has the numbers).
The heap then keeps its high-water mark, which depends on how a step's tensors happened to
fragment it: two processes of one run differed by up to about a hundred MB (measured with the
transient ~400 MB of ``bench.py scale --train``, which therefore runs without it).

The trainer and the restoration fit call it with their device: it applies on the CPU, only
under glibc, and not when the environment already sets malloc's parameters (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, a ``glibc.malloc.*`` entry of
``GLIBC_TUNABLES``) or ``LCM_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_applied = False


def keep_freed_memory(device=None) -> bool:
    """Set glibc's malloc to keep freed memory in the process when ``device`` (a
    ``torch.device``; default: the CPU) computes on the CPU; True if it is (now) set. On an
    accelerator the step's tensors are not in host memory: nothing is changed."""
    global _applied
    if device is not None and device.type != "cpu":
        return False
    if _applied:
        return True
    if sys.platform != "linux" or os.environ.get("LCM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave its allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Large blocks from the heap instead of mmap; the heap's top
    # is given back only past 2 GiB of free space.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
