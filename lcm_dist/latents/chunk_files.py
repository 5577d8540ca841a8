"""Whole-chunk reads and writes straight to the chunk files of an uncompressed Zarr array on a
local disk.

zarr-python writes a chunk to a new temporary file and renames it over the old one, and reads
it into a fresh ``bytes`` object that is then copied into the array it returns. For the latent
store's 6 MB chunks on a local disk that costs ~3 ms of CPU per write and ~1.2 ms per read, a
few times the kernel's own copy (``python launch/bench.py throughput``); on two cores the
difference is taken from the training step. The store's shadow paging makes the rename
unnecessary: a chunk is only ever written to the slot the committed table does not point at,
so nothing reads the file while it is rewritten in place, and a write cut short (a crash, a
full disk) leaves only uncommitted bytes behind. So for local, uncompressed slot arrays the
store reads a chunk file into its array with one copy and overwrites it in place.

The files are exactly those zarr-python writes and reads (same key, same bytes, the edge chunk
padded to the full chunk shape with the fill value): a store stays a plain Zarr v3 group, and
the tests check both directions against zarr itself. Compressed arrays and every other
filesystem (s3://, gcs://, memory://, ...) go through zarr.

``sync`` makes the writes durable before a checkpoint commits them, so a committed slot table
never points at chunk data still in the page cache: it fsyncs every chunk file written since
the last ``sync`` (``fdatasync`` for a full-size file overwritten in place, whose metadata did
not change), and the directory of each file this process created, or wrote for the first time
(a previous process may have died before syncing its entry), or that zarr renamed into place
(compressed arrays). A failed fsync is not retried: once the kernel has reported it, a second
fsync can succeed with the data lost, so the checkpoint fails and the previous one stands.

A local store is a local filesystem to the kernel; on NFS the in-place writes rely on its
close-to-open consistency (the default; not ``nocto``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _local_root(store) -> Path | None:
    """The directory a zarr store keeps its keys in, if it is a local filesystem."""
    from zarr.storage import FsspecStore, LocalStore

    if isinstance(store, LocalStore):
        return Path(store.root)
    if isinstance(store, FsspecStore):
        from fsspec.implementations.local import LocalFileSystem

        fs = getattr(store.fs, "sync_fs", store.fs)  # zarr wraps a sync filesystem
        if isinstance(fs, LocalFileSystem):
            return Path(store.path)
    return None


class LocalChunkFiles:
    """The chunk files of one 2-D Zarr v3 array on a local disk whose chunks span whole rows.
    ``direct``: uncompressed, so ``read`` and ``write`` do the I/O; otherwise zarr does it and
    ``written`` records what it wrote, for ``sync``."""

    def __init__(self, directory: Path, array):
        from zarr.codecs import BytesCodec

        meta = array.metadata
        codecs = tuple(meta.codecs)
        self.direct = (
            len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and getattr(codecs[0].endian, "value", None) in ("little", None)
        )
        self.directory = directory
        self.chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        self.dtype = np.dtype(meta.dtype.to_native_dtype()).newbyteorder("<")
        self.nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.fill_value = meta.fill_value
        self._key = meta.encode_chunk_key
        self._lock = threading.Lock()
        self._unsynced: dict[str, bool] = {}  # path -> its metadata changed (fsync, not fdatasync)
        self._dirs: set[str] = set()  # directories whose entries must be synced
        self._seen: set[str] = set()  # files this process has written (their entries synced)

    @classmethod
    def of(cls, array) -> LocalChunkFiles | None:
        """The array's chunk files, or None if they are not local files of whole rows."""
        shape, chunks = tuple(array.shape), tuple(array.metadata.chunk_grid.chunk_shape)
        if len(shape) != 2 or chunks[1] != shape[1]:
            return None
        root = _local_root(array.store)
        if root is None:
            return None
        return cls(root / array.path, array)

    def path(self, chunk: int) -> Path:
        return self.directory / self._key((chunk, 0))

    def read(self, chunk: int, rows: int) -> np.ndarray | None:
        """The chunk's first ``rows`` rows (a new array), or None if its file is missing or
        shorter than a chunk (damage: the store reports it)."""
        out = np.empty(self.chunk_shape, dtype=self.dtype)
        view = memoryview(out).cast("B")
        try:
            fd = os.open(self.path(chunk), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            done = 0
            while done < self.nbytes:
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    return None
                done += n
        finally:
            os.close(fd)
        return out[:rows]

    def write(self, chunk: int, data: np.ndarray) -> None:
        """Overwrite the chunk's file in place with ``data`` (its first rows; an edge chunk is
        padded with the fill value as zarr does)."""
        rows = data.shape[0]
        if rows == self.chunk_shape[0] and data.dtype == self.dtype and data.flags.c_contiguous:
            full = data
        else:
            full = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            full[:rows] = data
        view = memoryview(full).cast("B")
        path = self.path(chunk)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the chunk's directory is new
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                made = path.parent
                while made != self.directory and made.parent != made:
                    self._dirs.add(str(made.parent))
                    made = made.parent
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            resized = os.fstat(fd).st_size != self.nbytes  # new (or damaged): metadata changes
            done = 0
            while done < self.nbytes:
                done += os.pwrite(fd, view[done:], done)
            if resized:
                os.ftruncate(fd, self.nbytes)
        finally:
            os.close(fd)
        self._note(str(path), metadata=resized, entry=resized)

    def written(self, chunk: int) -> None:
        """Zarr wrote the chunk (a new file renamed over the old one): sync it and its entry."""
        self._note(str(self.path(chunk)), metadata=True, entry=True)

    def _note(self, path: str, metadata: bool, entry: bool) -> None:
        with self._lock:
            self._unsynced[path] = self._unsynced.get(path, False) or metadata
            if entry or path not in self._seen:
                self._seen.add(path)
                self._dirs.add(os.path.dirname(path))

    def sync(self, threads: int = 8) -> None:
        """Make every write so far durable (see the module's docstring). Raises the first
        ``OSError``; what was being synced then is not synced again."""
        with self._lock:
            files, dirs = self._unsynced, self._dirs
            self._unsynced, self._dirs = {}, set()
        jobs = [(p, os.O_WRONLY, os.fsync if meta else os.fdatasync) for p, meta in files.items()]
        # Deepest first: a directory's entry in its parent is synced after its own contents.
        jobs += [(d, os.O_RDONLY, os.fsync) for d in sorted(dirs, key=len, reverse=True)]
        if len(jobs) <= 1:
            for job in jobs:
                _sync(*job)
            return
        with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="latent-sync") as pool:
            for done in [pool.submit(_sync, *job) for job in jobs]:
                done.result()


def _sync(path: str, flags: int, how) -> None:
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (opening {path} to sync it)") from None
    try:
        how(fd)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (syncing {path})") from None
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (a new store's metadata)."""
    for here, _, names in os.walk(root, topdown=False):
        for name in names:
            _sync(os.path.join(here, name), os.O_RDONLY, os.fsync)
        _sync(here, os.O_RDONLY, os.fsync)
