"""What the latent store costs on object storage: objects, requests, their rate and price.

Every chunk of the store is one object (``<store>/slot0/c/<chunk>/0`` and the same under
``slot1``); the run reads each chunk it trains from the committed slot and writes it to the
other one (shadow paging), so after the first epoch an epoch's reads all go to one slot's key
prefix and its writes to the other's. Object stores bill per request and per byte-month and
serve a limited request rate per key prefix, so at a billion images the request count, not the
bytes, can decide whether a run works: the plan counts them from the replayed traffic.

The defaults are Amazon S3 Standard's published figures (us-east-1, 2026): GET $0.0004 and PUT
$0.005 per 1,000 requests, storage $0.023 per GB-month (https://aws.amazon.com/s3/pricing/);
at least 5,500 GET/HEAD and 3,500 PUT/COPY/POST/DELETE requests per second per partitioned
prefix, beyond which requests get "503 Slow Down" until S3 adds partitions
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html). Other
stores: give their prices and limits as flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcm_dist.planning.units import fmt_bytes as _b
from lcm_dist.planning.units import fmt_seconds as _t

GIB = 1 << 30


@dataclass(frozen=True)
class StorePrices:
    """Object storage prices and per-prefix request limits (defaults: S3 Standard)."""

    get_per_1000: float = 0.0004
    put_per_1000: float = 0.005
    storage_per_gb_month: float = 0.023
    """Per GB-month, GB as billed: 2^30 bytes."""
    get_per_second: float = 5500.0
    put_per_second: float = 3500.0


@dataclass(frozen=True)
class StoreTraffic:
    """One process's chunk requests in an epoch after the first (from the replay), and the
    epoch's length: what the section needs besides the config."""

    chunk_reads: float
    chunk_writes: float
    bytes_moved: float
    """Read plus written, as stored (compressed), per process per epoch."""
    epoch_seconds: float


def add_object_store_section(
    plan,
    prices: StorePrices,
    *,
    chunks: int,
    stored_chunk_bytes: float,
    stored_bytes: float,
    export_bytes: float,
    store_mbps: float,
    world: int,
    gpus_per_node: int,
    traffic: StoreTraffic | None,
    fixes: str,
    object_store: bool,
) -> None:
    """Objects, requests per epoch and per second, bandwidth per node, request and storage cost
    and the export's size and time; warnings where a per-prefix request limit is exceeded.
    ``stored_bytes``: both slots as stored; ``export_bytes``: read from the store plus written
    to the export; ``fixes``: the settings that make fewer, larger objects; ``object_store``:
    whether ``store.url`` is one (the request limits are warned about only then)."""
    plan.section(
        "object store: requests and cost (prices --get-price, --put-price, --storage-price)"
    )
    plan.add(
        "objects",
        f"{chunks:,} chunks per slot, {2 * chunks:,} in all, of {_b(stored_chunk_bytes)} each",
    )
    storage = stored_bytes / GIB * prices.storage_per_gb_month
    plan.add("storage", f"${storage:,.2f} per month for {_b(stored_bytes)}")
    plan.numbers.update(objects_per_slot=chunks, storage_cost_per_month=storage)
    if traffic is not None:
        gets, puts = traffic.chunk_reads * world, traffic.chunk_writes * world
        cost = gets / 1000 * prices.get_per_1000 + puts / 1000 * prices.put_per_1000
        get_rate, put_rate = gets / traffic.epoch_seconds, puts / traffic.epoch_seconds
        node = traffic.bytes_moved * gpus_per_node / traffic.epoch_seconds
        plan.add("requests", f"{gets:,.0f} GET and {puts:,.0f} PUT per epoch (epoch 1+)")
        plan.add(
            "request rate",
            f"{get_rate:,.0f} GET/s on one slot's prefix, {put_rate:,.0f} PUT/s on the other's "
            f"(limits {prices.get_per_second:,.0f} and {prices.put_per_second:,.0f} per prefix)",
        )
        plan.add("request cost", f"${cost:,.2f} per epoch")
        per = f"{gpus_per_node} process" + ("es" if gpus_per_node != 1 else "")
        plan.add("per node", f"{_b(node)}/s to and from the store ({per})")
        plan.numbers.update(
            get_requests_per_epoch=gets,
            put_requests_per_epoch=puts,
            get_requests_per_second=get_rate,
            put_requests_per_second=put_rate,
            request_cost_per_epoch=cost,
            node_bytes_per_second=node,
        )
        for kind, rate, limit in (
            ("GET", get_rate, prices.get_per_second),
            ("PUT", put_rate, prices.put_per_second),
        ):
            if object_store and rate > limit:
                plan.warnings.append(
                    f"the store gets {rate:,.0f} {kind} requests/s on one slot's key prefix, "
                    f"above the {limit:,.0f} per second an object store serves per prefix "
                    "(S3: the rest get 503 Slow Down and retry, and steps wait); make fewer, "
                    f"larger objects: {fixes}"
                )
    seconds = export_bytes / (store_mbps * 1e6)
    plan.add(
        "export",
        f"{_b(export_bytes)} read and written: at least {_t(seconds)} at {store_mbps:g} MB/s "
        "(launch/export.py copies in one process, a block at a time)",
    )
    plan.numbers.update(export_seconds=seconds)
