"""Export a run's newest checkpoint as a self-contained model for restoration.

    python launch/export.py --run runs/demo --out exports/demo.zarr
    python launch/export.py --run runs/big --out s3://bucket/models/big.zarr \\
        --out-options '{"endpoint_url": "http://127.0.0.1:9000"}'

The output is a Zarr v3 group (arrays latents, keys, noise, initial_phi; the model config in
its attributes) with generator.safetensors beside its zarr.json. Plain zarr-python and
safetensors read it; lcm-dist is not needed.
"""

from __future__ import annotations

import argparse
import sys

from lcm_dist.config import parse_options
from lcm_dist.export import export_run
from lcm_dist.latents.retry import StoreIOError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the run's run_dir")
    parser.add_argument("--out", required=True, help="output path or fsspec URL")
    parser.add_argument(
        "--out-options", default="{}", help="fsspec storage options for --out, as JSON"
    )
    parser.add_argument(
        "--shards", help="the run's shards folder, if it moved (its keys.txt names the images)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        options = parse_options(args.out_options, "--out-options")
        attrs = export_run(
            args.run,
            args.out,
            storage_options=options,
            shards=args.shards,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, StoreIOError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"exported {attrs['num_images']} latents (step {attrs['step']}, {attrs['checkpoint']}) "
        f"and the generator to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
