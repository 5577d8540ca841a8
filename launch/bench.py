"""Run a benchmark and print its measurements (one JSON object with --json).

python launch/bench.py latent       # batched latent nets vs a per-image loop
python launch/bench.py store        # latents paged through the Zarr store vs in RAM
python launch/bench.py step         # the trainer's step vs a bare PyTorch loop, local and S3
python launch/bench.py scale        # 1,000,000 vs 10,000 images: creation time, peak RSS
python launch/bench.py scale --train   # 2 epochs of 1,000,000 images, as many steps of 10,000:
                                       # rows once, store I/O per epoch, peak RSS, images/s
python launch/bench.py throughput   # raw store MB/s vs a plain file on the same disk
python launch/bench.py resume       # 8 processes verifying a checkpoint: every file each vs each once
python launch/bench.py fit          # launch/fit.py on 1 and 2 CPU processes: images/s, speedup
python launch/bench.py gpu          # the paper's model on this GPU: MFU, time shares, syncs,
                                    # trainer vs bare loop, restoration (--quick: tiny, CPU too)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from lcm_dist.benchmarks import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    parser.add_argument(
        "--quick", action="store_true", help="gpu: tiny sizes (the demo32 model), runs on a CPU"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="gpu: the device's dense bf16 peak for the MFU (default: from the device's name)",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="scale: train two epochs over the images (a tiny model on 2 processes) instead of "
        "a few hundred steps",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=1_000_000,
        help="scale --train: the large set's number of images (default 1,000,000)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="scale --train: run with the trainer's CPU malloc setting (freed memory kept on the "
        "heap) instead of returning it, so peak RSS is the heap's high-water mark",
    )
    args = parser.parse_args(argv)
    options = {}
    run = BENCHMARKS[args.name]
    if args.name == "gpu":
        options = {"quick": args.quick, "peak": args.peak_tflops}
    elif args.quick or args.peak_tflops:
        parser.error("--quick and --peak-tflops apply to the gpu benchmark only")
    if args.name == "scale" and args.train:
        from lcm_dist.benchmarks.epoch import SMALL_IMAGES, bench_scale_train

        if args.images <= SMALL_IMAGES:
            parser.error(f"--images must be larger than the {SMALL_IMAGES:,} it is compared with")
        run = bench_scale_train
        options = {"large": args.images, "keep_freed_memory": args.keep_freed_memory}
    elif args.train or args.images != 1_000_000 or args.keep_freed_memory:
        parser.error("--train, --images and --keep-freed-memory apply to scale --train only")
    if args.json:
        # Everything the benchmark prints (training logs, library warnings, subprocesses) goes
        # to stderr, so stdout holds the one JSON object.
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                result = run(**options)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        print(json.dumps(result), flush=True)
        return 0
    result = run(**options)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
