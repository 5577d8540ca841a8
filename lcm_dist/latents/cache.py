"""The write-back cache: a rank's window onto the latent store, within a memory budget.

The cache is told, at the start of each epoch, the order in which this rank will need the
store's chunks (a pure function of the epoch's shard plan). It reads chunks ahead of the
training step in background threads, hands the step a batch's rows as one (B, P) tensor, takes
the updated rows back as dirty, and once every row of a chunk has come back (each image is seen
once per epoch) writes the chunk back in the background and frees it. So in steady state the
step never waits on I/O, each chunk is read once and written once per epoch, and resident
memory stays under ``budget_bytes`` however large the store is.

If the budget is too small for the chunks in flight, chunks already written back to leave go
first, then clean chunks furthest in the future; a dirty chunk that must leave early is written
back (to the uncommitted slot) and read again when needed: correct, only slower.

What is resident does not depend on how fast the store is. A chunk written back to leave stays
(and counts against the budget) after its write completes, until the step's thread lets it go:
at the next ``write_rows`` (a batch later, the store having had the batch's compute to write
it), at ``flush``, or sooner in ``read_rows`` if its room is needed (waiting for the write only
then). So every decision to read ahead or to drop a chunk, and the peak, are the same whether
the background writes finish at once or during the next batch; only a store that lags a whole
batch behind holds chunks longer.

The background reads and writes retry transient store errors (``LatentStore.retry``). While
they do, a step that needs their chunk waits; instead of waiting silently, it prints a warning
naming the chunk, the store and how long it has waited, every ``stall_warning_seconds``. When
the retries run out the step raises ``StoreIOError`` and no further I/O is started.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from lcm_dist.latents.io_threads import ChunkEntry, io_pool
from lcm_dist.latents.retry import StallWarner, StoreIOError, StoreUnavailableError
from lcm_dist.latents.store import LatentStore

__all__ = ["StoreIOError", "WriteBackCache"]


class WriteBackCache:
    """Pages phi rows of a LatentStore through a bounded amount of memory."""

    def __init__(
        self,
        store: LatentStore,
        budget_bytes: int,
        io_threads: int = 2,
        prefetch_chunks: int = 64,
        stall_warning_seconds: float | None = None,
        io_niceness: int = 0,
    ):
        self.store = store
        self._stall = StallWarner(
            store,
            store.stall_warning_seconds if stall_warning_seconds is None else stall_warning_seconds,
        )
        self.rows_per_chunk = store.rows_per_chunk
        self.phi_size = store.phi_size
        self.budget = int(budget_bytes)
        self.chunk_bytes = self.rows_per_chunk * self.phi_size * 4
        if self.budget < self.chunk_bytes:
            raise ValueError(
                f"store.cache_bytes ({self.budget}) is smaller than one chunk "
                f"({self.chunk_bytes} bytes); raise it or lower store.rows_per_chunk"
            )
        self.prefetch_chunks = prefetch_chunks
        self._pool = io_pool(io_threads, io_niceness)
        self._cond = threading.Condition()
        self._entries: dict[int, ChunkEntry] = {}
        self._resident = 0
        self._error: str | None = None
        self._abort = threading.Event()  # set on the first I/O error: start no more I/O
        self.peak_resident = 0
        self.wait_seconds = 0.0
        self._order: list[int] = []
        self._pos: dict[int, int] = {}
        self._next = 0
        self._cursor = -1
        self._seen: dict[int, np.ndarray] = {}
        self._done: set[int] = set()

    # Epochs.

    def begin_epoch(self, chunk_order: list[int], done_rows=None) -> None:
        """The chunks this rank will need this epoch, in the order it will need them.
        ``done_rows``: rows this epoch already trained on before a resume; chunks they fill
        completely are not read again, the others are written back once their remaining
        rows are."""
        with self._cond:
            self._order = list(chunk_order)
            self._pos = {c: i for i, c in enumerate(self._order)}
            self._next, self._cursor = 0, -1
            self._seen.clear()
            self._done.clear()
            if done_rows is not None and len(done_rows):
                rows = np.asarray(torch.as_tensor(done_rows).cpu(), dtype=np.int64).reshape(-1)
                self._check_rows(rows)
                for chunk in np.unique(rows // self.rows_per_chunk).tolist():
                    sel = rows // self.rows_per_chunk == chunk
                    self._mark_seen(chunk, rows[sel] - chunk * self.rows_per_chunk)
        self._prefetch()

    def end_epoch(self) -> None:
        """Write back every dirty chunk, wait for all I/O, and free all memory."""
        self.flush()
        with self._cond:
            for chunk in [c for c, e in self._entries.items() if e.state == "ready"]:
                self._release(chunk)
            self._order, self._pos = [], {}
            self._seen.clear()
            self._done.clear()

    def flush(self) -> None:
        """Write back every dirty chunk and wait until all background I/O has finished."""
        start = time.perf_counter()
        with self._cond:
            for chunk, entry in self._entries.items():
                if entry.state == "ready" and entry.dirty:
                    self._start_write(chunk, drop=False)
            began = time.monotonic()
            while busy := [c for c, e in self._entries.items() if e.state != "ready"]:
                self._wait(began, busy[0])
            self._check()
            self._retire()
        self.wait_seconds += time.perf_counter() - start

    def close(self) -> None:
        self.flush()
        self._pool.shutdown(wait=True)

    # The step's interface.

    def read_rows(self, rows) -> torch.Tensor:
        """The rows' phi as a new (B, P) float32 tensor."""
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        chunks = np.unique(rows // self.rows_per_chunk).tolist()
        need = sum(self._nbytes(c) for c in chunks)
        if need > self.budget:
            raise ValueError(
                f"store.cache_bytes ({self.budget}) cannot hold the {len(chunks)} chunks one batch "
                f"touches ({need} bytes); raise it"
            )
        out = np.empty((rows.size, self.phi_size), dtype=np.float32)
        start = time.perf_counter()
        waited = False
        with self._cond:
            self._check()
            for entry in self._entries.values():
                entry.pinned = False
            wanted = set(chunks)
            for chunk in chunks:
                self._cursor = max(self._cursor, self._pos.get(chunk, -1))
                if chunk not in self._entries:
                    waited |= self._make_room(self._nbytes(chunk), wanted)
                    self._start_load(chunk)
            for chunk in chunks:
                waited |= self._acquire(chunk, wanted)
                self._entries[chunk].pinned = True
            for chunk in chunks:
                sel = rows // self.rows_per_chunk == chunk
                out[sel] = self._entries[chunk].data[rows[sel] - chunk * self.rows_per_chunk]
        if waited:
            self.wait_seconds += time.perf_counter() - start
        self._prefetch()
        return torch.from_numpy(out)

    def write_rows(self, rows, values: torch.Tensor) -> None:
        """Take a batch's updated rows back; complete chunks are written back in the background."""
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        values = values.detach().cpu().float().numpy()
        if values.shape != (rows.size, self.phi_size):
            raise ValueError(f"expected values of shape ({rows.size}, {self.phi_size})")
        start = time.perf_counter()
        waited = False
        with self._cond:
            self._check()
            self._retire()  # the chunks the last batches wrote back to leave
            chunks = np.unique(rows // self.rows_per_chunk).tolist()
            for chunk in chunks:
                waited |= self._acquire(chunk, set(chunks))  # it may have left under pressure
                entry = self._entries[chunk]
                sel = rows // self.rows_per_chunk == chunk
                local = rows[sel] - chunk * self.rows_per_chunk
                entry.data[local] = values[sel]
                entry.dirty = True
                entry.pinned = False
                if self._mark_seen(chunk, local):
                    self._start_write(chunk, drop=True)
        if waited:
            self.wait_seconds += time.perf_counter() - start
        self._prefetch()

    # Slot tables (shadow paging), passed through to the store.

    def changes(self) -> dict[int, int]:
        return self.store.changes()

    def apply_changes(self, changes: dict[int, int]) -> None:
        self.store.apply_changes(changes)

    def commit(self, persist: bool = True) -> None:
        self.store.commit(persist)

    def stats(self) -> dict[str, float]:
        c = self.store.counters
        return {
            "store/bytes_read": c.bytes_read,
            "store/bytes_written": c.bytes_written,
            "store/chunk_reads": c.chunk_reads,
            "store/chunk_writes": c.chunk_writes,
            "store/retries": c.retries,
            "store/io_wait_seconds": self.wait_seconds,
            "store/resident_bytes": self._resident,
            "store/peak_resident_bytes": self.peak_resident,
        }

    # Internals; the callers hold self._cond.

    def _nbytes(self, chunk: int) -> int:
        lo, hi = self.store.chunk_bounds(chunk)
        return (hi - lo) * self.phi_size * 4

    def _mark_seen(self, chunk: int, local: np.ndarray) -> bool:
        """Note that this epoch has finished the chunk's rows ``local`` (0-based in the chunk);
        True when that completes the chunk (it is then done: never read again this epoch)."""
        lo, hi = self.store.chunk_bounds(chunk)
        seen = self._seen.setdefault(chunk, np.zeros(hi - lo, dtype=bool))
        seen[local] = True
        if seen.all():
            self._done.add(chunk)
            return True
        return False

    def _check_rows(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= self.store.num_rows):
            raise IndexError(
                f"row {int(rows.max())} is outside the latent store's {self.store.num_rows} rows"
            )

    def _check(self) -> None:
        if self._error is not None:
            raise StoreIOError(self._error)

    def _wait(self, began: float, chunk: int) -> None:
        """Wait for news from the I/O threads, warning if the step has waited too long."""
        self._cond.wait(timeout=min(1.0, self._stall.every or 1.0))
        self._check()
        entry = self._entries.get(chunk)
        doing = {"loading": "reading it", "writing": "writing it back"}.get(
            entry.state if entry else "", "making room for it"
        )
        self._stall.check(began, f"chunk {chunk}", doing)

    def _reserve(self, chunk: int) -> ChunkEntry:
        entry = ChunkEntry(self._nbytes(chunk))
        self._entries[chunk] = entry
        self._resident += entry.nbytes
        self.peak_resident = max(self.peak_resident, self._resident)
        return entry

    def _release(self, chunk: int) -> None:
        entry = self._entries.pop(chunk)
        self._resident -= entry.nbytes

    def _retire(self, keep: set[int] = frozenset()) -> None:
        """Let go of the chunks (but ``keep``) whose write-back to leave has completed. Only the
        step's thread does this, at fixed points, so residency does not follow the store's
        speed."""
        for chunk in [c for c, e in self._entries.items() if e.drop_after_write]:
            if self._entries[chunk].state == "ready" and chunk not in keep:
                self._release(chunk)

    def _make_room(self, nbytes: int, keep: set[int]) -> bool:
        """Free memory until ``nbytes`` more fit; returns whether it had to wait."""
        waited = False
        began = time.monotonic()
        while self._resident + nbytes > self.budget:
            leaving = [c for c, e in self._entries.items() if e.drop_after_write and c not in keep]
            if leaving:
                # Gone already in a store that keeps up: wait for their writes if need be,
                # rather than drop a chunk that is still to be trained.
                if any(self._entries[c].state == "ready" for c in leaving):
                    self._retire(keep)
                    continue
                waited = True
                self._wait(began, leaving[0])
                continue
            victims = [
                c
                for c, e in self._entries.items()
                if e.state == "ready" and not e.pinned and c not in keep
            ]
            clean = [c for c in victims if not self._entries[c].dirty]
            far = lambda c: self._pos.get(c, len(self._order))  # noqa: E731
            if clean:
                self._release(max(clean, key=far))
                continue
            if victims:
                self._start_write(max(victims, key=far), drop=True)
            waited = True
            writing = [c for c, e in self._entries.items() if e.state != "ready"]
            self._wait(began, writing[0] if writing else min(keep, default=-1))
        return waited

    def _acquire(self, chunk: int, keep: set[int]) -> bool:
        """Make ``chunk`` resident and ready, loading it if it is absent and keeping it if it
        was being written back to leave; returns whether it had to wait."""
        waited = False
        began = time.monotonic()
        while True:
            entry = self._entries.get(chunk)
            if entry is None:
                waited |= self._make_room(self._nbytes(chunk), keep)
                if chunk not in self._entries:
                    self._start_load(chunk)
                continue
            entry.drop_after_write = False  # needed again: stay (once written)
            if entry.state == "ready":
                return waited
            waited = True
            self._wait(began, chunk)

    def _start_load(self, chunk: int) -> None:
        self._reserve(chunk)
        self._pool.submit(self._load, chunk)

    def _fail(self, err: Exception, what: str) -> None:
        """Report an I/O thread's error to the step's thread (the first one wins) and stop
        starting or retrying other I/O: the run is ending."""
        with self._cond:
            if self._error is None:
                self._error = (
                    str(err)
                    if isinstance(err, StoreUnavailableError)
                    else f"{what} of latent store {self.store.url} failed: {err}"
                )
            self._abort.set()
            self._cond.notify_all()

    def _load(self, chunk: int) -> None:
        if self._abort.is_set():
            return
        try:
            data = self.store.read_chunk(chunk, abort=self._abort)
        except Exception as err:
            self._fail(err, f"reading chunk {chunk}")
            return
        with self._cond:
            entry = self._entries[chunk]
            entry.data, entry.state = data, "ready"
            self._cond.notify_all()

    def _start_write(self, chunk: int, drop: bool) -> None:
        entry = self._entries[chunk]
        entry.state = "writing"
        entry.drop_after_write = drop
        self._pool.submit(self._write, chunk, entry.data)

    def _write(self, chunk: int, data: np.ndarray) -> None:
        if self._abort.is_set():
            return
        try:
            self.store.write_chunk(chunk, data, abort=self._abort)
        except Exception as err:
            self._fail(err, f"writing chunk {chunk}")
            return
        with self._cond:
            entry = self._entries[chunk]
            entry.dirty = False
            entry.state = "ready"  # if leaving, the step's thread lets it go (_retire)
            self._cond.notify_all()

    def _prefetch(self) -> None:
        """Start reads of the next chunks in this epoch's order while the budget allows."""
        with self._cond:
            while (
                self._next < len(self._order) and self._next <= self._cursor + self.prefetch_chunks
            ):
                chunk = self._order[self._next]
                if chunk in self._entries or chunk in self._done:
                    self._next += 1
                    continue
                if self._resident + self._nbytes(chunk) > self.budget:
                    break
                self._start_load(chunk)
                self._next += 1
