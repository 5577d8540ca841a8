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

Writing in place also lets the store make its writes durable before a checkpoint commits them:
``sync`` fsyncs the files written since the last ``sync`` (and the directories new ones were
created in), so a committed slot table never points at chunk data still in the page cache.
"""

from __future__ import annotations

import os
import threading
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
    """The chunk files of one 2-D Zarr v3 array whose chunks span whole rows."""

    def __init__(self, directory: Path, array):
        meta = array.metadata
        self.directory = directory
        self.chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        self.dtype = np.dtype(meta.dtype.to_native_dtype()).newbyteorder("<")
        self.nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.fill_value = meta.fill_value
        self._key = meta.encode_chunk_key
        self._lock = threading.Lock()
        self._unsynced: set[Path] = set()
        self._new_dirs: set[Path] = set()

    @classmethod
    def of(cls, array) -> LocalChunkFiles | None:
        """The array's chunk files, or None if zarr must do its I/O (compressed, not local,
        not whole rows)."""
        from zarr.codecs import BytesCodec

        meta = array.metadata
        codecs = tuple(meta.codecs)
        if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
            return None
        if getattr(codecs[0].endian, "value", "little") not in ("little", None):
            return None
        shape, chunks = tuple(array.shape), tuple(meta.chunk_grid.chunk_shape)
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
                self._new_dirs.add(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            done = 0
            while done < self.nbytes:
                done += os.pwrite(fd, view[done:], done)
            if os.fstat(fd).st_size != self.nbytes:
                os.ftruncate(fd, self.nbytes)
        finally:
            os.close(fd)
        with self._lock:
            self._unsynced.add(path)

    def sync(self) -> None:
        """Make every write so far durable: fsync the files and the directories made for them."""
        with self._lock:
            files, dirs = self._unsynced, self._new_dirs
            self._unsynced, self._new_dirs = set(), set()
        # A new chunk file's name is durable once its directory, and any directory made for
        # it up to the array's own, is synced too.
        made = {a for d in dirs for a in (d, *d.parents) if a.is_relative_to(self.directory)}
        try:
            for path in sorted(files):
                _fsync(path, os.O_WRONLY)
            for path in sorted(made, reverse=True):
                _fsync(path, os.O_RDONLY)
        except BaseException:
            with self._lock:  # still to be made durable by the next sync
                self._unsynced |= files
                self._new_dirs |= dirs
            raise


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
