"""Which rows live in which chunk of the latent store: pure index arithmetic, no I/O."""

from __future__ import annotations

MAX_AUTO_CHUNK_BYTES = 8 << 20
"""The automatic chunk's largest size on a filesystem."""
MAX_AUTO_OBJECT_CHUNK_BYTES = 16 << 20
"""... and on object storage, which bills and rate-limits per request: at a billion images of
the paper's phi on 128 x 8 GPUs, 8 MB chunks make ~2,900 PUT/s on one key prefix (83% of S3's
3,500) and $113 of requests an epoch; 16 MB chunks (125 rows) make 1,170 PUT/s and $45, with the
cache's least budget still within its default 1 GiB (``launch/plan.py``; docs/design.md)."""


def is_object_store(url: str) -> bool:
    """Whether a store URL names object storage (s3://, gs://, az://, ...): not a local path,
    file:// or memory://."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme not in ("file", "local", "memory")


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


def auto_rows_per_chunk(
    samples_per_shard: int, row_bytes: int, max_bytes: int = MAX_AUTO_CHUNK_BYTES
) -> int:
    """The largest divisor of ``samples_per_shard`` whose chunk is at most ``max_bytes`` (8 MB;
    at least 1 row): a shard then maps to whole chunks, and chunks are big enough that Zarr's
    per-chunk cost (~1 ms) is small next to the data."""
    best = 1
    for d in range(1, samples_per_shard + 1):
        if samples_per_shard % d == 0 and d * row_bytes <= max_bytes:
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
