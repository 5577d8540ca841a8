"""The restoration study's 49 photos, rebuilt from the Debian packages they come from.

``apt-get download`` fetches four packages (no root needed), ``dpkg-deb -x`` unpacks them into
a temporary folder, and each chosen photo is written as RGB JPEG (quality 92), resized with
Lanczos so that its longer side is at most 1024 pixels, as ``<package>__<name>.jpg``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from PIL import Image

MAX_SIDE = 1024
JPEG_QUALITY = 92

# Where each package installs its photos ({name} is the photo's name), and the photos taken.
PACKAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mate-backgrounds": (
        ("usr/share/backgrounds/mate/nature/{name}.jpg",),
        (
            "Aqua",
            "Blinds",
            "Dune",
            "FreshFlower",
            "Garden",
            "GreenMeadow",
            "LadyBird",
            "RainDrops",
            "Storm",
            "TwoWings",
            "Wood",
            "YellowFlower",
        ),
    ),
    "opencv-doc": (
        (
            "usr/share/doc/opencv-doc/examples/data/{name}.jpg",
            "usr/share/doc/opencv-doc/examples/data/{name}.png",
        ),
        (
            "aero1",
            "aloeL",
            "apple",
            "baboon",
            "basketball1",
            "board",
            "box_in_scene",
            "building",
            "butterfly",
            "chicky_512",
            "ela_original",
            "fruits",
            "graf1",
            "home",
            "leuvenA",
            "messi5",
            "orange",
            "rubberwhale1",
            "smarties",
            "squirrel_cls",
            "stuff",
        ),
    ),
    "palapeli-data": (
        ("usr/share/palapeli/collection/{name}.jpg",),
        (
            "castle-maintenon",
            "cincinnati-bridge",
            "citrus-fruits",
            "european-honey-bee",
            "panther-chameleon-female",
        ),
    ),
    # A wallpaper is a folder of images named after screen sizes; the largest is taken.
    "plasma-workspace-wallpapers": (
        ("usr/share/wallpapers/{name}/contents/images/*.jpg",),
        (
            "BytheWater",
            "ColdRipple",
            "ColorfulCups",
            "DarkestHour",
            "EveningGlow",
            "FallenLeaf",
            "Grey",
            "Kite",
            "OneStandsOut",
            "Path",
            "summer_1am",
        ),
    ),
}


class PhotoSourceError(RuntimeError):
    """A package or tool needed to rebuild the photos is not available."""


ALTERNATIVE = "any folder of your own photos works instead (pass it to launch/make_shards.py)"


def output_name(package: str, name: str) -> str:
    return f"{package}__{name}.jpg"


def find_source(root: str, package: str, name: str) -> str | None:
    """The file under the unpacked tree ``root`` that photo ``name`` of ``package`` comes
    from (the largest by pixel count where a pattern matches several), or None."""
    patterns, _ = PACKAGES[package]
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.join(root, pattern.format(name=glob.escape(name)))))
        if matches:
            return max(matches, key=lambda path: (_pixels(path), path))
    return None


def _pixels(path: str) -> int:
    with Image.open(path) as im:
        return im.size[0] * im.size[1]


def select_photos(root: str, packages: list[str] | None = None) -> tuple[dict[str, str], list]:
    """({output file name: source path}, [output names not found]) for the photos of
    ``packages`` (default: all) in the unpacked tree ``root``."""
    found, missing = {}, []
    for package in packages or list(PACKAGES):
        for name in PACKAGES[package][1]:
            source = find_source(root, package, name)
            if source is None:
                missing.append(output_name(package, name))
            else:
                found[output_name(package, name)] = source
    return found, missing


def resize_photo(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """RGB, scaled down (Lanczos, aspect kept) so that the longer side is at most max_side."""
    image = image.convert("RGB")
    w, h = image.size
    scale = max_side / max(w, h)
    if scale < 1:
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    return image


def write_photo(source: str, dest: str) -> tuple[int, int]:
    """Write ``source`` resized as a JPEG to ``dest``; returns the written size."""
    with Image.open(source) as im:
        image = resize_photo(im)
    tmp = dest + ".tmp"
    image.save(tmp, "JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, dest)
    return image.size


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise PhotoSourceError(
            f"{tool} not found: rebuilding the photos needs a Debian or Ubuntu machine "
            f"(apt-get and dpkg-deb); {ALTERNATIVE}"
        )


def download_package(package: str, folder: str) -> str:
    """``apt-get download`` the package's candidate version into folder; its .deb path."""
    result = subprocess.run(
        ["apt-get", "download", package], cwd=folder, capture_output=True, text=True
    )
    debs = sorted(glob.glob(os.path.join(folder, f"{glob.escape(package)}_*.deb")))
    if result.returncode != 0 or not debs:
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("E:")]
        reason = lines[-1] if lines else (result.stderr.strip().splitlines() or ["no .deb"])[-1]
        raise PhotoSourceError(
            f"could not download the Debian package {package} with apt-get download ({reason}; "
            f"'apt-get update' fetches missing package lists); {ALTERNATIVE}"
        )
    return debs[-1]


def extract_package(deb: str, root: str) -> None:
    result = subprocess.run(["dpkg-deb", "-x", deb, root], capture_output=True, text=True)
    if result.returncode != 0:
        raise PhotoSourceError(
            f"dpkg-deb could not unpack {os.path.basename(deb)} ({result.stderr.strip()}); "
            f"{ALTERNATIVE}"
        )


def get_photos(
    out: str, packages: list[str] | None = None, say: Callable[[str], None] = print
) -> tuple[list[str], list[str]]:
    """Download and unpack ``packages`` (default: all four) in a temporary folder and write
    their photos to ``out``; returns (written file names, file names not found)."""
    for tool in ("apt-get", "dpkg-deb"):
        _require(tool)
    packages = packages or list(PACKAGES)
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lcm-photos-") as work:
        root = os.path.join(work, "root")
        os.makedirs(root)
        for i, package in enumerate(packages, 1):
            say(f"[{i}/{len(packages)}] downloading {package}")
            deb = download_package(package, work)
            size = os.path.getsize(deb) / 1e6
            say(f"[{i}/{len(packages)}] unpacking {os.path.basename(deb)} ({size:.1f} MB)")
            extract_package(deb, root)
            os.remove(deb)
        found, missing = select_photos(root, packages)
        written = []
        for j, (dest, source) in enumerate(sorted(found.items()), 1):
            w, h = write_photo(source, os.path.join(out, dest))
            say(f"  {j:2d}/{len(found)} {dest} ({w}x{h})")
            written.append(dest)
    return written, missing
