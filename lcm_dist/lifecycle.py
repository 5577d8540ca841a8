"""The life of a training process: the run lock, stop signals, and never outliving the run.

* Preemption. SLURM and Kubernetes send SIGTERM (SLURM's ``--signal`` can send SIGUSR1 ahead of
  time) and wait a grace period before killing. ``StopSignals`` turns either into a request the
  training loop honours at the end of the current batch: every process agrees on it, the run
  commits a checkpoint and exits 0, and re-running the same command continues exactly.
* Launchers. ``torchrun`` and the deepspeed launcher start the training processes as their
  children. If a launcher is killed outright (``kill -9``, a lost node agent) nothing tells its
  children, which would train on unsupervised while a re-run collides with them. A watchdog
  thread notices when the process's launcher ancestors are gone and ends the process at once,
  as a crash would (the last commit resumes).
* Data-loader workers are forked children: they must die with the training process and must
  not react to the stop signals themselves (the training process decides when to stop).
* Failing. When a process fails, the person at the terminal should read its error last, not
  the other processes' lines or a launcher's: ``end_with_error`` has the other processes say
  one short line at once and wait to be stopped by the launcher, while the failing process
  says its error a moment later, leaves it for torchrun's summary, and exits.
* The run lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the holding
  process dies, and unlike ``flock`` a forked child (a loader worker) does not inherit it, so a
  killed run's orphaned workers cannot keep its folder locked.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def share_cores() -> None:
    """Give this process its share of the node's cores, OMP_NUM_THREADS = cores / processes on
    the node, unless the environment sets it. Call before torch is imported: the OpenMP and
    BLAS pools, and the data-loader workers forked later, read it at start. torchrun sets it
    (to 1) when it starts several processes; the deepspeed launcher does not."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // max(1, int(local))))


_PR_SET_PDEATHSIG = 1


class RunLockedError(ValueError):
    """Another process trains in this run folder."""


class StopSignals:
    """Records the first SIGTERM/SIGUSR1 instead of dying; restores the old handlers on close."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(
                f"lcm-dist: {self.received} received; finishing this batch, then checkpointing",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def lock_run_dir(run_dir: str):
    """Take the exclusive lock on ``<run_dir>/.lock``; returns the open lock file (the lock
    lasts while it stays open, and ends with the process however it ends). Raises
    RunLockedError naming the holder if another process has it."""
    import fcntl

    from lcm_dist.files import make_folder

    make_folder(run_dir, "run folder")
    handle = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):  # not "held by another process"
            handle.close()
            raise RunLockedError(
                f"cannot lock {os.path.join(run_dir, '.lock')} ({os.strerror(err.errno or 0)}): "
                "the filesystem of run_dir seems to lack POSIX record locks (some NFS or Lustre "
                "mounts); mount it with locking (Lustre: -o flock; NFS: not nolock) or put "
                "run_dir on a filesystem that has them"
            ) from None
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        by = f" ({holder})" if holder else ""
        raise RunLockedError(
            f"another training process{by} is using {run_dir}; wait for it to end or stop it, "
            "then re-run"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: die with the training process, and leave the
    stop signals to it (a SIGTERM sent to the whole process group would otherwise kill the
    worker and fail the batch the training process is about to checkpoint after)."""
    die_with_parent()
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


_LAUNCHER_SCRIPTS = {"torchrun", "deepspeed"}
_LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "deepspeed.launcher")


def is_launcher(argv: list[str]) -> bool:
    """``torchrun ...``, ``deepspeed ...`` (run by a python or not) or ``python -m`` one of
    their modules."""
    if any(os.path.basename(a) in _LAUNCHER_SCRIPTS for a in argv[:2]):
        return True
    modules = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"]
    return any(m.startswith(_LAUNCHER_MODULES) for m in modules[:1])


def _parent_and_command(pid: int) -> tuple[int, list[str]] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # The command name in stat is parenthesised and may hold spaces: split after its ')'.
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    return ppid, [a.decode(errors="replace") for a in argv if a]


def launcher_ancestors() -> list[int]:
    """Pids of the launcher processes above this one (the torchrun agent; the deepspeed
    launcher and its runner), nearest first; empty for a plain ``python`` run."""
    found, pid = [], os.getppid()
    while pid > 1:
        info = _parent_and_command(pid)
        if info is None:
            break
        ppid, argv = info
        if not is_launcher(argv):
            break
        found.append(pid)
        pid = ppid
    return found


def _alive(pid: int) -> bool:
    info = _parent_and_command(pid)
    if info is None:
        return False
    try:  # a killed process stays a zombie until its parent reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def watch_launchers(interval: float = 0.5) -> list[int]:
    """End this process if its parent or any launcher above it goes away. Returns the watched
    pids (empty under plain ``python``, whose parent is a shell)."""
    watched = launcher_ancestors()
    if not watched:
        return []
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            gone = [pid for pid in watched if not _alive(pid)]
            if os.getppid() != parent or gone:
                print(
                    f"lcm-dist: the launcher of this process (pid {(gone or [parent])[0]}) is "
                    f"gone; process {os.environ.get('RANK', '?')} stops too (re-running the "
                    "command resumes from the last checkpoint)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    return watched


PEER_DELAY_SECONDS = 0.3
"""How long a process that stopped for another's error waits before its one line, so that a
progress bar the failing process draws is closed first."""
CAUSE_DELAY_SECONDS = 1.0
"""How long a failing process of a multi-process run waits before printing its error, so that
the other processes' one-line notes come first."""
PEER_WAIT_SECONDS = 10.0
"""How long a process that stopped for another's error waits for the launcher to stop it, so
that the launcher sees the failing process exit first (and names it as the root cause)."""


def end_with_error(message: str, *, cause: bool = True) -> int:
    """Print this process's last line on stderr, ``error: <message>`` (or, for a process that
    stops because another failed, ``lcm-dist: process R stops too: <message>``), and return
    the exit status (2). In a run of several processes (``WORLD_SIZE`` > 1), the process whose
    error stopped the run (``cause``) prints after ``CAUSE_DELAY_SECONDS`` and writes the
    message to the error file torchrun reads for its failure summary
    (``TORCHELASTIC_ERROR_FILE``); the others print after ``PEER_DELAY_SECONDS`` and then wait
    up to ``PEER_WAIT_SECONDS`` for the launcher, which ends them when the failing process
    exits."""
    several = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if several and cause:
        time.sleep(CAUSE_DELAY_SECONDS)
        _write_launcher_error_file(message)
    if cause:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        if several:
            time.sleep(PEER_DELAY_SECONDS)
        rank = os.environ.get("RANK", "?")
        print(f"lcm-dist: process {rank} stops too: {message}", file=sys.stderr, flush=True)
    if several and not cause:
        time.sleep(PEER_WAIT_SECONDS)
    return 2


def _write_launcher_error_file(message: str) -> None:
    """The error file of torchelastic's ``record`` format: its summary shows ``py_callstack``
    as the failure's traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": f"error: {message}", "timestamp": str(int(time.time()))},
        }
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then lacks the message; the error is on stderr all the same
