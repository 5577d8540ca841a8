"""Rebuild the restoration study's 49 photos from the Debian packages they come from.

    python launch/get_photos.py --out data/photos

Needs a Debian or Ubuntu machine (apt-get and dpkg-deb; no root) and downloads about 240 MB:
plasma-workspace-wallpapers, mate-backgrounds, opencv-doc and palapeli-data. Each photo is
written as <package>__<name>.jpg, resized so that its longer side is at most 1024 pixels
(Lanczos), JPEG quality 92. Any folder of your own photos works as well for make_shards.py.
"""

from __future__ import annotations

import argparse
import sys

from lcm_dist.data.photos import PACKAGES, PhotoSourceError, get_photos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder to write the photos to")
    parser.add_argument(
        "--packages",
        nargs="+",
        choices=list(PACKAGES),
        help="only these packages' photos (default: all four)",
    )
    args = parser.parse_args(argv)
    try:
        written, missing = get_photos(args.out, args.packages, say=lambda s: print(s, flush=True))
    except PhotoSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} photos to {args.out}")
    if missing:
        print(
            f"error: {len(missing)} photos are not in these package versions: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
