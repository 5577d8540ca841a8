"""Write WebDataset shards of fixed size from image files, folders or globs.

    python launch/make_shards.py ../photos/ 'more/*.jpg' extra.png --out data/shards
    python launch/make_shards.py data/shards --verify      # check checksums of a finished set
    python launch/make_shards.py photos/ --exclude 'test-*' --random-crops 5000 --out data/crops

Sample i (in the order given; folders and globs sorted) gets global row index i, the row of the
latent store that holds its phi. Images are centre-cropped to a square and resized to
--image-size; --resize squash --normalize minmax prepares them as the authors prepared CelebA
(the whole image squashed to the square, then each image's values stretched to span 0-255):

    python launch/make_shards.py celeba/img_align_celeba/ --out data/celeba128-shards \
        --image-size 128 --resize squash --normalize minmax --format jpg
 The folder gets shard-NNNNNN.tar files, keys.txt (line i = source of row i) and
manifest.json (shard list, counts, row ranges, image size, SHA-256 checksums), written last.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys

from lcm_dist.data.demo import random_crops
from lcm_dist.data.shards import (
    IMAGE_FORMATS,
    collect_sources,
    load_photos,
    verify_shards,
    write_pngs,
    write_shards,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] SOURCE [SOURCE ...] --out FOLDER\n"
        "       %(prog)s --verify FOLDER [FOLDER ...]",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="image files, folders or glob patterns (with --verify alone: finished shard sets)",
    )
    parser.add_argument(
        "--out",
        metavar="FOLDER",
        help="output folder, required unless --verify checks finished sets (must not hold a "
        "shard set already)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels (%(default)s)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="images per shard (%(default)s)"
    )
    parser.add_argument(
        "--random-crops",
        type=int,
        default=0,
        metavar="N",
        help="instead of one centre crop per image, take N random square crops in all, from "
        "each image in turn at scales from 1.5x --image-size to half its shorter side; "
        "crop i of photo P gets the key 'P#crop<i>@<top>,<left>,<side>'",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-crops (%(default)s)")
    parser.add_argument(
        "--resize",
        choices=("crop", "squash"),
        default="crop",
        help="crop: the centre square (default); squash: the whole image, its aspect ratio "
        "changed (the authors' CelebA preparation)",
    )
    parser.add_argument(
        "--normalize",
        choices=("none", "minmax"),
        default="none",
        help="minmax: stretch each image's values to span 0-255 (the authors' per-image "
        "min-max scaling); none: keep them (default)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out files whose name matches this glob pattern (repeatable), e.g. to hold "
        "photos out of a training set",
    )
    parser.add_argument(
        "--png",
        action="store_true",
        help="write the images as NNNNNN.png files instead of shards (e.g. an evaluation set)",
    )
    parser.add_argument(
        "--format",
        choices=sorted(IMAGE_FORMATS),
        default=None,
        help="encoding of the images inside the shards (default png: lossless; jpg is smaller)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the checksums of the finished sets given as sources (with --out: of the "
        "set just written)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that decode, resize and encode the images (0: one per core); the "
        "shards are the same whatever the number",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.verify and not args.out:
            for folder in args.sources:
                verify_shards(folder)
                print(f"{folder}: all shards match the manifest")
            return 0
        if not args.out:
            parser.error("--out is required (unless --verify checks finished sets)")
        if args.png and args.format:
            parser.error("--format is for shards; --png always writes PNG files")
        files = [
            path
            for path in collect_sources(args.sources)
            if not any(fnmatch.fnmatch(os.path.basename(path), p) for p in args.exclude)
        ]
        if not files:
            raise ValueError("every source image was excluded by --exclude")
        print(f"{len(files)} images from {len(args.sources)} source(s)", flush=True)
        if args.random_crops:
            samples = random_crops(
                args.random_crops, args.image_size, args.seed, photos=load_photos(files)
            )
        else:
            samples = ((path, path) for path in files)
        if args.png:
            count = write_pngs(
                samples,
                args.out,
                args.image_size,
                overwrite=args.overwrite,
                resize=args.resize,
                normalize=args.normalize,
            )
            print(f"wrote {count} PNG files (000000.png ...) and keys.txt to {args.out}")
            return 0
        write_shards(
            samples,
            args.out,
            args.image_size,
            args.samples_per_shard,
            image_format=args.format or "png",
            progress=not args.quiet,
            overwrite=args.overwrite,
            resize=args.resize,
            normalize=args.normalize,
            workers=args.workers or len(os.sched_getaffinity(0)),
        )
        if args.verify:
            verify_shards(args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
