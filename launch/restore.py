"""Restore degraded images with a trained LCM export (the generator frozen, a fresh phi fitted
per image, many images at once).

    python launch/restore.py --model exports/photos64.zarr --task inpaint holes/*.png --out out/
    python launch/restore.py --model M --task inpaint img.png --mask mask.png --out out/
    python launch/restore.py --model M --task superres small/*.png --factor 4 --out out/
    python launch/restore.py --model M --task colorize gray/*.png --out out/
    python launch/restore.py --model M --reconstruct 0 17 'photo.jpg#crop3@...' --out out/

Inputs must already have the model's size (super-resolution: the size divided by --factor);
colour inputs to colorize are converted to luminance. For inpainting, the hole is a mask file
(white = hole, black = known; the model's size), --box F (a centred square of F x the side,
default 0.5), --random-boxes N or --random-pixels F; the outputs keep the observed pixels and
take only the holes from the model (--raw: the model's whole image). --reconstruct renders
training images from their exported latents, by row number or key.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch


def _observations(paths, operator, size, task):
    from lcm_dist.files import collect_sources, load_image

    files = collect_sources(paths)
    side = operator.observed_size(size)
    images = []
    for path in files:
        image = load_image(path)
        if image.size != (side, side):
            what = "this model restores"
            if task == "superres":
                what = f"--task superres --factor {operator.factor} with this model takes"
            raise ValueError(
                f"image {path} is {image.size[0]}x{image.size[1]} but {what} {side}x{side} images"
            )
        mode = "L" if task == "colorize" else "RGB"
        arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(arr)
        images.append(tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1))
    y = torch.stack(images)
    if task == "inpaint":
        y = operator(y)  # pixels in the holes carry no information
    return y, files


def _output_names(files: list[str], out: str) -> list[str]:
    """``<input name>.png`` in ``out`` for each input; refuses two inputs with one output
    name and an output that would overwrite an input."""
    names = [os.path.splitext(os.path.basename(path))[0] + ".png" for path in files]
    seen: dict[str, str] = {}
    for path, name in zip(files, names, strict=True):
        if name in seen:
            raise ValueError(f"inputs {seen[name]} and {path} would both be restored to {name}")
        seen[name] = path
        if os.path.abspath(os.path.join(out, name)) == os.path.abspath(path):
            raise ValueError(f"restoring {path} into --out {out} would overwrite it")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --model MODEL --task TASK [options] IMAGE [IMAGE ...] --out FOLDER\n"
        "       %(prog)s --model MODEL --reconstruct ROW_OR_KEY [...] --out FOLDER",
    )
    from lcm_dist.restore.cli import add_fit_arguments

    add_fit_arguments(parser, task_required=False)
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="degraded images, folders or globs (required unless --reconstruct)",
    )
    parser.add_argument(
        "--reconstruct",
        nargs="+",
        metavar="ROW_OR_KEY",
        default=[],
        help="render training images from the export, by row number or key (keys.txt of the "
        "shards); written as rowNNNNNNNN.png",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="FOLDER",
        help="output folder (created when there is something to write; an empty one made by a "
        "failed run is removed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random masks")
    parser.add_argument("--save-latents", action="store_true", help="also write phi as Zarr")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        from lcm_dist.config import parse_options
        from lcm_dist.files import output_folder
        from lcm_dist.restore.cli import settle_fit_arguments
        from lcm_dist.restore.model import load_model

        restoring = bool(args.images) or not args.reconstruct
        if restoring and (args.task is None or not args.images):
            parser.error("give --task and images to restore (or --reconstruct)")
        settle_fit_arguments(args, restoring)
        model = load_model(
            args.model, parse_options(args.model_options, "--model-options"), args.device
        )
        with output_folder(args.out, "output folder"):
            _write(args, model, restoring)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _write(args, model, restoring: bool) -> None:
    """Reconstruct and restore into the output folder ``args.out``."""
    from lcm_dist.files import collect_sources
    from lcm_dist.images import to_png_bytes
    from lcm_dist.restore.cli import operator_from_args, restore_from_args, save_latents
    from lcm_dist.restore.degrade import finish

    if args.reconstruct:
        rows = list(dict.fromkeys(model.row_of(k) for k in args.reconstruct))
        keys = model.group["keys"]
        for row, image in zip(rows, model.reconstruct(rows), strict=True):
            path = os.path.join(args.out, f"row{row:08d}.png")
            with open(path, "wb") as f:
                f.write(to_png_bytes(image))
            if not args.quiet:
                print(f"row {row} ({keys[row]}) -> {path}")
        print(f"reconstructed {len(rows)} training image(s) into {args.out}")
        if not restoring:
            return
    size = model.image_size
    count = len(collect_sources(args.images))
    operator = operator_from_args(args, size, count)
    y, files = _observations(args.images, operator, size, args.task)
    names = _output_names(files, args.out)
    images, phi, seconds = restore_from_args(model, y, operator, args)
    images = finish(operator, y, images, args.finish)
    for name, image in zip(names, images, strict=True):
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(to_png_bytes(image))
    if args.save_latents:
        save_latents(
            os.path.join(args.out, "latents.zarr"),
            phi,
            names,
            {
                "model": args.model,
                "task": args.task,
                "iterations": args.iterations,
                "optimizer": args.optimizer,
                "lr": args.lr,
            },
        )
    print(f"restored {len(files)} image(s) in {seconds:.1f}s into {args.out}")


if __name__ == "__main__":
    sys.exit(main())
