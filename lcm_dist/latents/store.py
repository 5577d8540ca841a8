"""The latent store: every image's phi row in a chunked Zarr v3 group on any fsspec URL.

Layout of the group (``zarr.open_group(url)`` reads it with plain zarr-python)::

    attrs     format, version, num_rows, phi_size, rows_per_chunk, dtype, codec, model
    initial   (P,) float32        the shared initial phi every image starts from
    slot0     (N, P) dtype        chunk data, chunks of (rows_per_chunk, P): whole rows
    slot1     (N, P) dtype        the second copy of every chunk (shadow paging)
    slots     (num_chunks,) int8  which slot holds each chunk's committed data; -1 = never
                                  written, the rows read as ``initial``

Creating a store writes only metadata and ``initial``: O(1) in the number of rows. A chunk
that was never written costs nothing to read: its rows are ``initial``.

Shadow paging: a chunk is always written to the slot that the committed table does *not*
point at, so a write never touches committed data. The live table (in memory) says where each
chunk's newest data is; ``commit`` makes it the committed one by writing ``slots``. A process
that dies between commits leaves the committed state readable as it was. Because of that, the
chunk files of a local, uncompressed store are overwritten in place rather than through
zarr's write-and-rename (``chunk_files.py``: a quarter of the CPU), and ``sync`` makes them
durable before a checkpoint commits them.

Storage faults: every chunk read and write, the slot-table write and opening the store retry
transient errors (lost or refused connections, timeouts, HTTP 5xx, throttling) with bounded
exponential backoff (``lcm_dist.latents.retry``); repeating a write is safe because it only ever
touches the uncommitted slot.

Index arithmetic (which rows live in which chunk) is in pure functions in ``layout.py``; what a
store records (format, model signature, codecs) and its I/O counters in ``format.py``; opening
the store a run's config describes is in ``run_store.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np

from lcm_dist.faults import crash_point, fail_point
from lcm_dist.latents.chunk_files import LocalChunkFiles, sync_tree
from lcm_dist.latents.format import (  # noqa: F401  (re-exported: what a store records)
    FORMAT,
    SLOTS_CHUNK,
    VERSION,
    IOCounters,
    chunk_codecs,
    model_signature,
)
from lcm_dist.latents.layout import (  # noqa: F401  (re-exported: the store's index arithmetic)
    auto_rows_per_chunk,
    chunk_bounds,
    chunks_of_rows,
    num_chunks,
)
from lcm_dist.latents.retry import RetryPolicy, StoreIOError, plain_reason, reason, store_options
from lcm_dist.latents.zarr_groups import open_checked_group


class LatentStore:
    """N phi rows in a Zarr v3 group. Thread-safe for reads and writes of distinct chunks.

    ``retry`` bounds how long a failing chunk read or write is retried; the cache warns when
    the step has waited ``stall_warning_seconds`` for the store (0 = never)."""

    def __init__(
        self,
        group,
        url: str,
        retry: RetryPolicy | None = None,
        stall_warning_seconds: float = 30.0,
    ):
        import zarr

        self.url = url
        self.group = group
        self.retry = retry or RetryPolicy()
        self.stall_warning_seconds = stall_warning_seconds
        self.last_error: tuple[float, str] | None = None  # (monotonic time, reason) of a retry
        opening = self.retry.opening()

        def load(op):  # metadata reads, each retried on its own (a few requests each)
            return opening.call(op, "opening the latent store", url)

        attrs = dict(group.attrs)
        self.attrs = attrs
        self.num_rows = int(attrs["num_rows"])
        self.phi_size = int(attrs["phi_size"])
        self.rows_per_chunk = int(attrs["rows_per_chunk"])
        self.num_chunks = num_chunks(self.num_rows, self.rows_per_chunk)
        self.dtype = np.dtype(attrs["dtype"])
        self.initial = load(lambda: np.asarray(group["initial"][:], dtype=np.float32))
        self._data = [load(lambda: group["slot0"]), load(lambda: group["slot1"])]
        # Local slots: chunk files read and overwritten directly if uncompressed, and synced
        # before a commit (chunk_files.py).
        self._files = [LocalChunkFiles.of(array) for array in self._data]
        self.read_only = bool(getattr(group.store, "read_only", False))
        self._slots_array: zarr.Array = load(lambda: group["slots"])
        self.committed = load(lambda: np.asarray(self._slots_array[:], dtype=np.int8))
        self.live = self.committed.copy()
        self.counters = IOCounters()
        self._lock = threading.Lock()

    def _retry(self, op, what: str, stop: threading.Event | None = None):
        """``op()`` under the store's retry policy; ``what`` names it in errors."""
        return self.retry.call(
            op, f"{what} of latent store", self.url, on_retry=self._note, stop=stop
        )

    def _note(self, err: BaseException) -> None:
        with self._lock:
            self.counters.retries += 1
            self.last_error = (time.monotonic(), reason(err))

    # Creating and opening.

    @classmethod
    def create(
        cls,
        url: str,
        *,
        num_rows: int,
        initial: np.ndarray,
        signature: dict,
        rows_per_chunk: int,
        codec: str = "none",
        codec_level: int = 1,
        dtype: str = "float32",
        storage_options: dict | None = None,
        retry: RetryPolicy | None = None,
        stall_warning_seconds: float = 30.0,
    ) -> LatentStore:
        """Create an empty store (every row reads as ``initial``); fails if one exists.

        Each step is retried on transient errors (``retry.opening()``). A step that failed
        after reaching the store is safe to repeat: the group is reopened (mode ``a``) rather
        than refused as existing, and the arrays, written only here, are overwritten."""
        import zarr

        initial = np.asarray(initial, dtype=np.float32).reshape(-1)
        if num_rows <= 0 or rows_per_chunk <= 0:
            raise ValueError("a latent store needs num_rows and rows_per_chunk > 0")
        if initial.size != signature["phi_size"]:
            raise ValueError("initial phi does not have the signature's phi_size")
        policy = (retry or RetryPolicy()).opening()
        options = store_options(url, storage_options)
        modes = iter(["w-"])  # the first attempt refuses an existing store; retries reopen

        def step(op, what="creating the latent store"):
            return policy.call(op, what, url)

        try:
            group = step(
                lambda: zarr.open_group(url, mode=next(modes, "a"), storage_options=options)
            )
        except FileExistsError:
            raise ValueError(f"cannot create a latent store at {url}: it already exists") from None
        except StoreIOError:
            raise
        except Exception as err:
            raise ValueError(
                f"cannot create a latent store at {url}: {plain_reason(err)}"
            ) from None
        chunks = num_chunks(num_rows, rows_per_chunk)
        for name in ("slot0", "slot1"):
            step(
                lambda name=name: group.create_array(
                    name,
                    shape=(num_rows, initial.size),
                    chunks=(rows_per_chunk, initial.size),
                    dtype=dtype,
                    # A written chunk that goes missing reads as NaN (caught), never as a
                    # valid phi.
                    fill_value=float("nan"),
                    compressors=chunk_codecs(codec, codec_level),
                    overwrite=True,
                )
            )
        step(lambda: group.create_array("initial", data=initial, overwrite=True))
        step(
            lambda: group.create_array(
                "slots",
                shape=(chunks,),
                chunks=(min(chunks, SLOTS_CHUNK),),
                dtype="int8",
                fill_value=-1,
                overwrite=True,
            )
        )
        attrs = {
            "format": FORMAT,
            "version": VERSION,
            "num_rows": num_rows,
            "phi_size": int(initial.size),
            "rows_per_chunk": rows_per_chunk,
            "dtype": dtype,
            "codec": codec,
            "model": signature,
        }
        step(lambda: group.attrs.update(attrs))
        store = cls(group, url, retry, stall_warning_seconds)
        if store._files[0] is not None:  # a local store: its metadata reaches the disk now
            sync_tree(store._files[0].directory.parent)
        return store

    @classmethod
    def open(
        cls,
        url: str,
        *,
        signature: dict | None = None,
        min_rows: int = 0,
        storage_options: dict | None = None,
        mode: str = "r+",
        retry: RetryPolicy | None = None,
        stall_warning_seconds: float = 30.0,
    ) -> LatentStore:
        """Open an existing store, checking it against the model and the dataset size."""
        group, attrs = open_checked_group(
            url, mode, storage_options, "latent store", FORMAT, VERSION, retry
        )
        if signature is not None and attrs.get("model") != signature:
            theirs, ours = attrs.get("model", {}), signature
            diff = ", ".join(
                f"{k}: store {theirs.get(k)!r} vs config {ours.get(k)!r}"
                for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)
            )
            raise ValueError(
                f"latent store {url} was made for another model ({diff}); point store.url "
                "elsewhere or use the model it was made for"
            )
        if attrs["num_rows"] < min_rows:
            raise ValueError(
                f"latent store {url} holds {attrs['num_rows']} rows but the dataset has "
                f"{min_rows} images; make a new store for this dataset"
            )
        return cls(group, url, retry, stall_warning_seconds)

    @classmethod
    def exists(
        cls, url: str, storage_options: dict | None = None, retry: RetryPolicy | None = None
    ) -> bool:
        import fsspec

        def look():
            fs, path = fsspec.core.url_to_fs(url, **(store_options(url, storage_options) or {}))
            return fs.exists(path.rstrip("/") + "/zarr.json")

        try:
            return (retry or RetryPolicy()).opening().call(look, "opening the latent store", url)
        except StoreIOError:
            raise
        except Exception as err:  # e.g. no fsspec backend installed for the URL's protocol
            raise ValueError(
                f"cannot open the latent store at {url}: {plain_reason(err)}"
            ) from None

    # Chunks.

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.rows_per_chunk, self.num_rows)

    def chunk_nbytes(self, chunk: int) -> int:
        """Logical bytes of a chunk as stored."""
        start, stop = self.chunk_bounds(chunk)
        return (stop - start) * self.phi_size * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Logical bytes of all rows as stored (one slot)."""
        return self.num_rows * self.phi_size * self.dtype.itemsize

    def read_chunk(self, chunk: int, abort: threading.Event | None = None) -> np.ndarray:
        """The chunk's newest rows as a new (rows, P) float32 array. Transient errors are
        retried (``self.retry``; no new attempt once ``abort`` is set)."""
        start, stop = self.chunk_bounds(chunk)
        slot = int(self.live[chunk])
        if slot < 0:
            return np.broadcast_to(self.initial, (stop - start, self.phi_size)).copy()
        files = self._files[slot]
        if files is not None and files.direct:
            read = lambda: files.read(chunk, stop - start)  # noqa: E731
        else:
            read = lambda: self._data[slot][start:stop]  # noqa: E731
        data = self._retry(read, f"reading chunk {chunk}", abort)
        if data is not None:
            data = np.asarray(data, dtype=np.float32)
        if data is None or np.isnan(data[:, 0]).any():
            raise ValueError(
                f"chunk {chunk} (rows {start}-{stop - 1}) of slot{slot} in latent store "
                f"{self.url} is missing or damaged; the committed latents cannot be read"
            )
        with self._lock:
            self.counters.bytes_read += self.chunk_nbytes(chunk)
            self.counters.chunk_reads += 1
        return data

    def write_chunk(
        self, chunk: int, data: np.ndarray, abort: threading.Event | None = None
    ) -> None:
        """Write a whole chunk to the slot the committed table does not use. Transient errors
        are retried (``self.retry``): repeating the write only rewrites that uncommitted slot."""
        start, stop = self.chunk_bounds(chunk)
        if data.shape != (stop - start, self.phi_size):
            raise ValueError(f"chunk {chunk} needs shape {(stop - start, self.phi_size)}")
        if self.read_only:
            raise ValueError(
                f"latent store {self.url} is open read-only; chunk {chunk} not written"
            )
        target = 1 if self.committed[chunk] == 0 else 0
        crash_point("store.write_chunk")
        stored = data.astype(self.dtype, copy=False)
        files = self._files[target]

        def write():
            if files is not None and files.direct:
                files.write(chunk, stored)
            else:
                self._data[target][start:stop] = stored
                if files is not None:
                    files.written(chunk)

        self._retry(write, f"writing chunk {chunk}", abort)
        with self._lock:
            self.live[chunk] = target
            self.counters.bytes_written += self.chunk_nbytes(chunk)
            self.counters.chunk_writes += 1

    def read_rows(self, rows: Iterable[int]) -> np.ndarray:
        """Rows in any order (whole chunks are read; for tools and tests, not the hot path)."""
        rows = np.asarray(list(rows), dtype=np.int64)
        out = np.empty((rows.size, self.phi_size), dtype=np.float32)
        for chunk in np.unique(rows // self.rows_per_chunk):
            data = self.read_chunk(int(chunk))
            sel = rows // self.rows_per_chunk == chunk
            out[sel] = data[rows[sel] - chunk * self.rows_per_chunk]
        return out

    # Slot tables.

    def changes(self) -> dict[int, int]:
        """Chunks whose newest data is not committed yet: {chunk: slot}."""
        idx = np.nonzero(self.live != self.committed)[0]
        return {int(c): int(self.live[c]) for c in idx}

    def apply_changes(self, changes: dict[int, int]) -> None:
        """Learn where other processes wrote their chunks."""
        for chunk, slot in changes.items():
            self.live[int(chunk)] = slot

    def sync(self) -> None:
        """Make this process's chunk writes so far durable (local files are fsynced; an object
        store's writes are durable when they return). Call before committing them. A failure is
        not retried (see ``chunk_files``): it raises ``StoreIOError``."""
        try:
            fail_point("store.sync")
            for files in self._files:
                if files is not None:
                    files.sync()
        except OSError as err:
            raise StoreIOError(
                f"making the chunk writes of latent store {self.url} durable failed "
                f"({plain_reason(err)}); nothing new was committed, and the last checkpoint "
                "resumes"
            ) from None

    def commit(self, persist: bool = True) -> None:
        """Make the live slot table the committed one (and write it to ``slots``)."""
        changed = np.nonzero(self.live != self.committed)[0]
        if persist and changed.size:
            live = self.live.copy()

            def write():
                self._slots_array[:] = live

            self._retry(write, "writing the slot table")
        self.committed = self.live.copy()

    def restore_slots(self, slots: np.ndarray) -> None:
        """Adopt a checkpoint's slot table as both committed and live (resuming): writes made
        after that checkpoint are in the other slots and are ignored."""
        slots = np.asarray(slots, dtype=np.int8)
        if slots.shape != (self.num_chunks,):
            raise ValueError(
                f"the checkpoint's slot table has {slots.size} chunks but latent store {self.url} "
                f"has {self.num_chunks}; it belongs to another store"
            )
        self.committed = slots.copy()
        self.live = slots.copy()
