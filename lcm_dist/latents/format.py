"""What a latent store records and counts: its format tag and version, the model signature
that refuses a config the store was not made for, the chunk codecs, and the I/O counters.
Pure data (zarr is imported only to build codecs), so planning code can use it without a store.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "lcm-dist-latents"
VERSION = 1
SLOTS_CHUNK = 1 << 20


def model_signature(model_cfg) -> dict:
    """What a store records about the model, to refuse a config it was not made for."""
    from lcm_dist.model.latent_net import phi_layout

    return {
        "phi_size": phi_layout(model_cfg).size,
        "noise_channels": model_cfg.noise_channels,
        "latent_widths": list(model_cfg.latent_widths),
        "phi_init_seed": model_cfg.phi_init_seed,
        "preset": model_cfg.preset,
    }


def chunk_codecs(codec: str, level: int) -> list:
    import zarr.codecs

    if codec == "none":
        return []
    if codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=level)]
    if codec == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")]
    raise ValueError(f"unknown latent store codec {codec!r}; use none, zstd or blosc")


@dataclass
class IOCounters:
    """Cumulative store traffic (logical bytes: rows x P x storage itemsize)."""

    bytes_read: int = 0
    bytes_written: int = 0
    chunk_reads: int = 0
    chunk_writes: int = 0
    retries: int = 0  # store operations repeated after a transient error
