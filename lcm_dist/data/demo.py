"""The CPU demo: shards made from photos that scikit-image installs, then a short training run.

Nothing is downloaded. Random square crops at several scales of scikit-image's bundled photos
are resized to the model's resolution and written as WebDataset shards; then the run in
``configs/demo.json`` trains on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

# scikit-image's bundled photos (no fetching needed); grayscale ones are replicated to RGB.
DEMO_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
    "grass",
    "gravel",
    "brick",
)


def demo_photos() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8 array) for each bundled photo."""
    import skimage.data

    photos = []
    for name in DEMO_PHOTOS:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        photos.append((name, arr[:, :, :3].astype(np.uint8)))
    return photos


def random_crops(
    count: int,
    image_size: int,
    seed: int = 0,
    min_side: int | None = None,
    photos: list[tuple[str, np.ndarray]] | None = None,
) -> Iterator[tuple[str, Image.Image]]:
    """``count`` random square crops of ``photos`` ((name, HxWx3 uint8) pairs; by default the
    bundled ones), taken from each photo in turn at scales from ``min_side`` pixels (default
    1.5 x image_size) up to half the photo's shorter side, resized to image_size."""
    rng = np.random.default_rng(seed)
    photos = photos if photos is not None else demo_photos()
    min_side = min_side or int(image_size * 1.5)
    for i in range(count):
        name, arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        side = int(rng.integers(min_side, max(min_side + 1, min(h, w) // 2)))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(arr[top : top + side, left : left + side])
        yield (
            f"{name}#crop{i}@{top},{left},{side}",
            crop.resize((image_size, image_size), Image.Resampling.LANCZOS),
        )


def make_demo_shards(out_dir: str, count: int, image_size: int, samples_per_shard: int) -> dict:
    """Write the demo shards unless a manifest is already there; returns the manifest."""
    from lcm_dist.data.shards import load_manifest, write_shards

    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        manifest = load_manifest(out_dir)
        if manifest["image_size"] == image_size and manifest["num_samples"] == count:
            return manifest
        raise ValueError(
            f"{out_dir} already holds other shards ({manifest['num_samples']} images at "
            f"{manifest['image_size']}px); delete it or point data.shards elsewhere"
        )
    return write_shards(random_crops(count, image_size), out_dir, image_size, samples_per_shard)
