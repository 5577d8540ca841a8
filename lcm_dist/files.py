"""Image files and output folders: expanding sources into image files, decoding and preparing
images, creating folders for a command's output. The bottom layer that data/, images.py,
restore/ and the launch scripts share.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def collect_sources(sources: Iterable[str]) -> list[str]:
    """Expand image files, folders (recursively) and glob patterns into a list of files.

    Each source keeps its place in the order; within a folder or glob, files are sorted. A source
    that matches no image is an error (it would silently shift every later row index).
    """
    files: list[str] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matched = sorted(p for p in glob.glob(source, recursive=True) if _is_image(p))
        elif os.path.isdir(source):
            matched = sorted(
                str(p) for p in Path(source).rglob("*") if p.is_file() and _is_image(str(p))
            )
        elif os.path.isfile(source):
            matched = [source]
        else:
            raise ValueError(f"image source {source!r} does not exist")
        if not matched:
            raise ValueError(f"image source {source!r} matches no image files")
        files.extend(matched)
    return files


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


RESIZE_MODES = ("crop", "squash")
NORMALIZE_MODES = ("none", "minmax")


def prepare_image(
    image: Image.Image, image_size: int, resize: str = "crop", normalize: str = "none"
) -> Image.Image:
    """RGB, made square and resized to ``image_size`` (Lanczos): ``resize`` "crop" takes the
    centre square, "squash" resizes the whole image, changing its aspect ratio (the authors'
    CelebA preparation). ``normalize`` "minmax" then stretches the image's values to span
    0-255 (its darkest value to 0, its brightest to 255, over all channels: the authors'
    per-image min-max scaling to [0, 1]); "none" keeps them."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(
            f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {normalize!r}"
        )
    image = image.convert("RGB")
    w, h = image.size
    if resize == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        w = h = side
    if (w, h) != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    if normalize == "minmax":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = pixels.min(), pixels.max()
        if high > low:
            scaled = np.rint((pixels - low) * (255.0 / (high - low)))
            image = Image.fromarray(scaled.astype(np.uint8), "RGB")
    return image


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image file, with an error naming the file if it cannot be."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None


def load_photos(paths: Iterable[str]) -> list[tuple[str, np.ndarray]]:
    """(path, HxWx3 uint8 RGB array) of each image file, for cropping."""
    return [(path, np.asarray(load_image(path).convert("RGB"))) for path in paths]


def make_folder(path: str | os.PathLike, what: str) -> Path:
    """Create the output folder ``path`` (and its parents); a one-line ValueError naming it
    (``what``: e.g. "output folder") when that is impossible."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the {what} {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = err.strerror[:1].lower() + err.strerror[1:] if err.strerror else str(err)
        raise ValueError(f"cannot create the {what} {out}: {why}") from None
    return out


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """``make_folder`` for a command's output: if the command then fails, the folders created
    here that are still empty are removed again (files already written are kept)."""
    out = Path(path)
    created = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        created.append(folder)
    make_folder(out, what)
    try:
        yield out
    except BaseException:
        for folder in created:  # the output folder first, then its new parents
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                break
        raise
