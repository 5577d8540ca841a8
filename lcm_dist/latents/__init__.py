"""Per-image latents: the chunked Zarr store, the write-back cache, the in-RAM table, retries."""
