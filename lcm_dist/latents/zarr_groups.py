"""Opening lcm-dist's Zarr groups safely: Zarr v3 only, a format and version check, and only
codecs that cannot run code (no pickle filters), with transient errors retried."""

from __future__ import annotations

from lcm_dist.latents.retry import RetryPolicy, StoreIOError, plain_reason, store_options

SAFE_CODECS = frozenset(
    {"bytes", "transpose", "zstd", "blosc", "gzip", "crc32c", "vlen-utf8", "vlen-bytes"}
)
"""Zarr codecs lcm-dist decodes. Anything else (e.g. a pickle filter) is refused: decoding
data must never run code from it."""


def open_group_v3(url: str, mode: str, storage_options: dict | None = None):
    """``zarr.open_group`` restricted to Zarr v3 (the v2 format can name a pickle filter)."""
    import zarr

    return zarr.open_group(
        url, mode=mode, zarr_format=3, storage_options=store_options(url, storage_options)
    )


def check_codecs(group, url: str, call=None) -> None:
    """Refuse a group with an array whose codecs are not all in ``SAFE_CODECS``. ``call(fn)``
    runs each metadata read (one listing, then one per array), e.g. under a retry policy, so
    that a transient error repeats one small request rather than all of them."""
    import warnings

    call = call or (lambda fn: fn())
    with warnings.catch_warnings():
        # An export keeps generator.safetensors beside its arrays; zarr warns about it.
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        names = call(lambda: sorted(group.array_keys()))
        arrays = [(name, call(lambda n=name: group[n])) for name in names]
    for name, array in arrays:
        codecs = [c.to_dict().get("name") for c in getattr(array.metadata, "codecs", ())]
        unsafe = [c for c in codecs if c not in SAFE_CODECS]
        if unsafe:
            raise ValueError(
                f"array {name!r} of {url} uses the codec(s) {', '.join(map(str, unsafe))}, "
                f"which lcm-dist does not decode (allowed: {', '.join(sorted(SAFE_CODECS))})"
            )


def open_checked_group(
    url: str,
    mode: str,
    storage_options: dict | None,
    what: str,
    fmt: str,
    version: int,
    retry: RetryPolicy | None = None,
):
    """Open one of lcm-dist's Zarr groups (``what``: "latent store", "export"); returns
    ``(group, attrs)`` after checking its format attribute, version and codecs. Transient
    errors are retried for a short while (``RetryPolicy.opening``)."""

    def open_group():
        group = open_group_v3(url, mode, storage_options)
        return group, dict(group.attrs)

    policy = (retry or RetryPolicy()).opening()
    try:
        group, attrs = policy.call(open_group, f"opening the {what}", url)
    except FileNotFoundError:
        raise ValueError(f"no {what} at {url}") from None
    except StoreIOError:
        raise
    except Exception as err:
        raise ValueError(f"cannot open the {what} at {url}: {plain_reason(err)}") from None
    if attrs.get("format") != fmt:
        raise ValueError(f"{url} is not an lcm-dist {what} (no format {fmt!r} attribute)")
    if attrs.get("version") != version:
        raise ValueError(
            f"{what} {url} has format version {attrs.get('version')}; this lcm-dist reads "
            f"version {version}"
        )
    check_codecs(group, url, lambda fn: policy.call(fn, f"opening the {what}", url))
    return group, attrs
