"""The write-back cache's background I/O: a pool of threads that read and write chunks below
the step's priority, and the state of a chunk as those threads and the step share it."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

IO_NICENESS = 10
"""How many nice levels the I/O threads drop below the process when the CPU computes the step
(``io_niceness``); on a GPU node the cores the threads compete with are the loader's, which the
step waits for as much as for the store, so there they keep the process's priority."""


def lower_priority(by: int) -> None:
    """Lower this I/O thread's scheduling priority by ``by`` nice levels (Linux: nice is per
    thread), so that when every core computes, the step's threads run first and the reads and
    writes ahead of the step fill the gaps. They still progress: a step that waits on them
    leaves its cores idle."""
    if by <= 0:
        return
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(os.getpriority(os.PRIO_PROCESS, me) + by, 19))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the same priority
        pass


@dataclass
class ChunkEntry:
    nbytes: int
    state: str = "loading"  # loading -> ready <-> writing
    data: np.ndarray | None = None
    dirty: bool = False
    pinned: bool = False  # rows handed to the step and not yet written back
    drop_after_write: bool = False  # leaving: let go by the step's thread once written


def io_pool(threads: int, niceness: int) -> ThreadPoolExecutor:
    """``threads`` I/O threads, each ``niceness`` nice levels below the process."""
    return ThreadPoolExecutor(
        threads, thread_name_prefix="latent-io", initializer=lower_priority, initargs=(niceness,)
    )
