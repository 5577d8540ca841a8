"""Evaluate restoration: degrade clean images, restore them with the LCM and baselines, score.

    python launch/evaluate.py --model exports/photos64.zarr --task inpaint \\
        --images data/heldout --out eval/inpaint --baselines dip,naive
    python launch/evaluate.py --model M --task superres --factor 4 --images DIR --out DIR

Clean images of any size are centre-cropped and resized to the model's resolution. Methods:
``lcm`` (a fresh phi per image, the generator frozen), ``dip`` (Deep Image Prior: a per-image
hourglass fitted with Adam from noise) and ``naive`` (biharmonic or mean fill, bicubic
upsampling, luminance only). The LCM and DIP get the same number of iterations unless
--dip-iterations says otherwise (several counts: one DIP fit per image, read out after each,
reported as dip@N); --no-lcm scores the baselines only. Inpainted
images are scored as launch/restore.py writes them, with the observed pixels put back (--raw:
each method's whole output). Writes report.json (PSNR and SSIM per image and mean; over the
hole too for inpainting), grid.png (a row per image; labelled columns: clean, degraded, then
each method) and TensorBoard events under DIR/tb.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from lcm_dist.restore.cli import add_fit_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fit_arguments(parser, task_required=True)
    parser.add_argument("--images", nargs="+", required=True, help="clean images or folders")
    parser.add_argument(
        "--out",
        required=True,
        metavar="FOLDER",
        help="output folder (an empty one made by a failed run is removed)",
    )
    parser.add_argument(
        "--baselines", default="dip,naive", help="comma list of dip, naive (%(default)s)"
    )
    parser.add_argument(
        "--fill",
        choices=["biharmonic", "mean"],
        default="biharmonic",
        help="the naive inpainting fill",
    )
    parser.add_argument("--dip-lr", type=float, default=0.01, help="Adam lr of DIP")
    parser.add_argument(
        "--dip-iterations",
        metavar="N[,N...]",
        help="DIP's iterations (default: --iterations); several: read out after each (dip@N)",
    )
    parser.add_argument(
        "--no-lcm", action="store_true", help="score the baselines only (no phi fit)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random masks and DIP")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lcm_dist.evaluate.report import format_table

    print(format_table(report))
    print(f"report: {args.out}/report.json, grid: {args.out}/grid.png")
    return 0


def run(args) -> dict:
    from lcm_dist.evaluate.run import evaluate
    from lcm_dist.files import output_folder
    from lcm_dist.restore.cli import settle_fit_arguments

    baselines = [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - {"dip", "naive"}
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(sorted(unknown))}; use dip, naive")
    if args.no_lcm and not baselines:
        raise ValueError("--no-lcm leaves nothing to score; name --baselines")
    settle_fit_arguments(args)
    try:
        dip_counts = sorted(
            {int(n) for n in (args.dip_iterations or str(args.iterations)).split(",")}
        )
    except ValueError:
        raise ValueError(f"--dip-iterations {args.dip_iterations!r}: use N or N,N,...") from None
    if dip_counts[0] < 1:
        raise ValueError(f"--dip-iterations must be at least 1, got {args.dip_iterations}")
    with output_folder(args.out, "output folder"):  # before the fits, not after
        return evaluate(args, baselines, dip_counts)


if __name__ == "__main__":
    sys.exit(main())
