"""Evaluate restoration: degrade clean images, restore them with the LCM and baselines, score.

    python launch/evaluate.py --model exports/photos64.zarr --task inpaint \\
        --images data/heldout --out eval/inpaint --baselines dip,naive
    python launch/evaluate.py --model M --task superres --factor 4 --images DIR --out DIR

Clean images of any size are centre-cropped and resized to the model's resolution. Methods:
``lcm`` (a fresh phi per image, the generator frozen), ``dip`` (Deep Image Prior: a per-image
hourglass fitted with Adam from noise) and ``naive`` (biharmonic or mean fill, bicubic
upsampling, luminance only). The LCM and DIP get the same number of iterations. Inpainted
images are scored as launch/restore.py writes them, with the observed pixels put back (--raw:
each method's whole output). Writes report.json (PSNR and SSIM per image and mean; over the
hole too for inpainting), grid.png (a row per image; labelled columns: clean, degraded, then
each method) and TensorBoard events under DIR/tb.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from lcm_dist.restore import add_fit_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fit_arguments(parser, task_required=True)
    parser.add_argument("--images", nargs="+", required=True, help="clean images or folders")
    parser.add_argument("--out", required=True, help="output folder")
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
    parser.add_argument("--seed", type=int, default=0, help="seed of random masks and DIP")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lcm_dist.evaluate import format_table

    print(format_table(report))
    print(f"report: {args.out}/report.json, grid: {args.out}/grid.png")
    return 0


def run(args) -> dict:
    import torch

    from lcm_dist.baselines import dip_restore
    from lcm_dist.config import parse_options
    from lcm_dist.degrade import DEFAULT_BOX
    from lcm_dist.evaluate import load_images, score, write_report
    from lcm_dist.restore import (
        iteration_bar,
        load_model,
        operator_from_args,
        restore_from_args,
        settle_fit_arguments,
    )
    from lcm_dist.shards import make_folder

    baselines = [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - {"dip", "naive"}
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(sorted(unknown))}; use dip, naive")
    settle_fit_arguments(args)
    make_folder(args.out, "output folder")  # before the fits, not after
    model = load_model(
        args.model, parse_options(args.model_options, "--model-options"), args.device
    )
    size = model.image_size
    clean, names = load_images(args.images, size)
    operator = operator_from_args(args, size, clean.shape[0], fill=args.fill)
    torch.manual_seed(args.seed)
    y = operator(clean)
    progress = not args.quiet
    results = {}
    images, _, seconds = restore_from_args(model, y, operator, args)
    results["lcm"] = {"images": images, "iterations": args.iterations, "seconds": seconds}
    if "dip" in baselines:
        bar = iteration_bar(clean.shape[0] * args.iterations, "dip") if progress else None
        images, seconds = dip_restore(
            y,
            operator,
            size,
            iterations=args.iterations,
            lr=args.dip_lr,
            seed=args.seed,
            progress=bar,
            device=args.device,
        )
        if bar is not None:
            bar.close()
        results["dip"] = {"images": images, "iterations": args.iterations, "seconds": seconds}
    if "naive" in baselines:
        import time

        start = time.perf_counter()
        images = operator.naive(y)
        results["naive"] = {
            "images": images,
            "iterations": 0,
            "seconds": time.perf_counter() - start,
        }
    for r in results.values():
        if args.task == "inpaint" and not args.raw:
            # Scored as restore.py writes them: the observed pixels put back, only holes filled.
            r["images"] = operator.paste(y, r["images"])
        r["metrics"] = score(clean, r["images"], operator)
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "iterations",
            "optimizer",
            "lr",
            "dip_lr",
            "factor",
            "box",
            "random_boxes",
            "random_pixels",
            "mask",
            "fill",
            "raw",
            "seed",
        )
    }
    settings["images"] = len(names)
    if args.task == "inpaint" and not (args.mask or args.random_boxes or args.random_pixels):
        settings["box"] = DEFAULT_BOX if args.box is None else args.box
    if args.task != "superres":
        settings["factor"] = None
    if args.task != "inpaint":
        settings["raw"] = None
    return write_report(
        args.out,
        task=args.task,
        names=names,
        clean=clean,
        observed_view=operator.show(y),
        results=results,
        settings=settings,
    )


if __name__ == "__main__":
    sys.exit(main())
