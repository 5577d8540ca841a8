"""Print what a run will need and whether it can work, before it starts.

    python launch/plan.py --config configs/big.json --images 1000000 --nodes 4 --gpus-per-node 8

Without --images the config's shards are read (their manifest); with it, shards of
--samples-per-shard images are assumed (launch/make_shards.py's default, 1000). Cluster figures
the config does not hold are flags with stated defaults; the output lists them.
"""

from __future__ import annotations

import argparse
import json
import sys

from lcm_dist.config import add_override_argument, load_config
from lcm_dist.data.shards import load_manifest
from lcm_dist.planning.compression import compression_ratio, sample_rows
from lcm_dist.planning.cost import Cluster, measure_inner_step, model_cost
from lcm_dist.planning.object_store import StorePrices
from lcm_dist.planning.plan import assumptions_text, make_plan
from lcm_dist.planning.replay import synthetic_manifest

DEFAULTS = Cluster()
PRICES = StorePrices()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="path of the run's JSON config")
    add_override_argument(parser)
    parser.add_argument("--images", type=int, help="plan for this many images (no shards read)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="with --images (%(default)s)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes (%(default)s)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=1, help="processes per node (%(default)s)"
    )
    parser.add_argument(
        "--accelerator-tflops",
        type=float,
        default=DEFAULTS.accelerator_tflops,
        help="dense bf16 peak TFLOP/s of one accelerator (%(default)s: a current GPU)",
    )
    parser.add_argument(
        "--utilisation",
        type=float,
        default=DEFAULTS.utilisation,
        help="fraction of that peak reached (%(default)s)",
    )
    parser.add_argument(
        "--interconnect-gbps",
        type=float,
        default=DEFAULTS.interconnect_gbps,
        help="Gbit/s of each process's slowest link for gradients (%(default)s)",
    )
    parser.add_argument(
        "--store-mbps",
        type=float,
        default=DEFAULTS.store_mbps,
        help="MB/s of the latent store, shared by all processes (%(default)s)",
    )
    parser.add_argument(
        "--checkpoint-mbps",
        type=float,
        default=DEFAULTS.checkpoint_mbps,
        help="MB/s of the run folder's filesystem, shared by all processes (%(default)s)",
    )
    prices = parser.add_argument_group(
        "object store prices and limits",
        "defaults: Amazon S3 Standard, us-east-1 (https://aws.amazon.com/s3/pricing/; request "
        "rates per prefix: https://docs.aws.amazon.com/AmazonS3/latest/userguide/"
        "optimizing-performance.html)",
    )
    for flag, name, text in (
        ("--get-price", "get_per_1000", "USD per 1,000 GET requests"),
        ("--put-price", "put_per_1000", "USD per 1,000 PUT requests"),
        ("--storage-price", "storage_per_gb_month", "USD per GB-month stored (GB = 2^30 bytes)"),
        ("--get-limit", "get_per_second", "GET requests per second one key prefix serves"),
        ("--put-limit", "put_per_second", "PUT requests per second one key prefix serves"),
    ):
        prices.add_argument(
            flag,
            type=float,
            default=getattr(PRICES, name),
            dest=name,
            help=f"{text} (%(default)s)",
        )
    step = parser.add_mutually_exclusive_group()
    step.add_argument(
        "--step-seconds",
        type=float,
        help="seconds per batch, all inner steps (default: estimated from the model's FLOPs "
        "and the cluster options above)",
    )
    step.add_argument(
        "--measure",
        action="store_true",
        help="time one inner step on this machine (its GPU, else CPU) for the batch time",
    )
    parser.add_argument("--json", action="store_true", help="print the main numbers as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        positive = ("nodes", "gpus_per_node", "accelerator_tflops", "interconnect_gbps")
        positive += ("store_mbps", "checkpoint_mbps", "utilisation")
        positive += ("get_per_second", "put_per_second")
        flags = {"get_per_second": "get-limit", "put_per_second": "put-limit"}
        for name in positive:
            if getattr(args, name) <= 0:
                raise ValueError(f"--{flags.get(name, name.replace('_', '-'))} must be positive")
        for name, flag in (
            ("get_per_1000", "get-price"),
            ("put_per_1000", "put-price"),
            ("storage_per_gb_month", "storage-price"),
        ):
            if getattr(args, name) < 0:
                raise ValueError(f"--{flag} must not be negative")
        if args.step_seconds is not None and args.step_seconds <= 0:
            raise ValueError("--step-seconds must be positive")
        if args.images is not None:
            manifest = synthetic_manifest(args.images, args.samples_per_shard, cfg.model.image_size)
            dataset = (
                f"{args.images:,} images assumed in shards of {args.samples_per_shard:,} "
                "(--images, --samples-per-shard)"
            )
        else:
            manifest = load_manifest(cfg.data.shards)
            dataset = f"the manifest of {cfg.data.shards}"
        measured = measure_inner_step(cfg) if args.measure else None
        cluster = Cluster(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            accelerator_tflops=args.accelerator_tflops,
            utilisation=args.utilisation,
            interconnect_gbps=args.interconnect_gbps,
            store_mbps=args.store_mbps,
            checkpoint_mbps=args.checkpoint_mbps,
            step_seconds=args.step_seconds,
        )
        rows, rows_note = sample_rows(cfg, 64)
        ratio = compression_ratio(cfg, rows)
        store_prices = StorePrices(
            **{name: getattr(args, name) for name in StorePrices.__dataclass_fields__}
        )
        plan = make_plan(
            cfg,
            manifest,
            dataset,
            cluster,
            model_cost(cfg),
            ratio,
            rows_note,
            measured,
            store_prices,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**plan.numbers, "warnings": plan.warnings}))
        return 0
    print(f"plan for {args.config} ({cfg.model.preset} model)")
    print(assumptions_text(cluster))
    print(plan.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
