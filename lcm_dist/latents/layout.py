"""Which rows live in which chunk of the latent store: pure index arithmetic, no I/O."""

from __future__ import annotations

MAX_AUTO_CHUNK_BYTES = 8 << 20


def num_chunks(num_rows: int, rows_per_chunk: int) -> int:
    return -(-num_rows // rows_per_chunk)


def chunk_bounds(chunk: int, rows_per_chunk: int, num_rows: int) -> tuple[int, int]:
    """[start, stop) rows of ``chunk`` (the last chunk may be short)."""
    start = chunk * rows_per_chunk
    return start, min(start + rows_per_chunk, num_rows)


def chunks_of_rows(first_row: int, count: int, rows_per_chunk: int) -> range:
    """The chunks that hold rows [first_row, first_row + count)."""
    if count <= 0:
        return range(0)
    return range(first_row // rows_per_chunk, (first_row + count - 1) // rows_per_chunk + 1)


def auto_rows_per_chunk(samples_per_shard: int, row_bytes: int) -> int:
    """The largest divisor of ``samples_per_shard`` whose chunk is at most 8 MB (at least 1):
    a shard then maps to whole chunks, and chunks are big enough that Zarr's per-chunk cost
    (~1 ms) is small next to the data."""
    best = 1
    for d in range(1, samples_per_shard + 1):
        if samples_per_shard % d == 0 and d * row_bytes <= MAX_AUTO_CHUNK_BYTES:
            best = d
    return best


def min_cache_bytes(data, rows_per_chunk: int, phi_size: int) -> tuple[int, int]:
    """(chunks, bytes) that one batch may touch at once: the least ``store.cache_bytes`` a run
    with the data section ``data`` can start with. A batch draws from each loader worker's
    shuffle window of consecutive rows, so it touches at most this many chunks (and never more
    than one per image); the cache holds them as float32."""
    window_chunks = -(-(data.shuffle_buffer + data.batch_size) // rows_per_chunk) + 1
    chunks = min(data.batch_size, max(1, data.num_workers) * window_chunks)
    return chunks, chunks * rows_per_chunk * phi_size * 4
