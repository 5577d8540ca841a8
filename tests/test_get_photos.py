"""Rebuilding the study's photos: which file each photo comes from, and how it is resized.

Runs on a fake unpacked package tree; nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from lcm_dist.data.photos import (
    PACKAGES,
    find_source,
    resize_photo,
    select_photos,
    write_photo,
)


def _save(root, relpath, size, mode="RGB"):
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(size[0])
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_the_study_takes_49_photos_from_four_packages():
    assert sorted(PACKAGES) == [
        "mate-backgrounds",
        "opencv-doc",
        "palapeli-data",
        "plasma-workspace-wallpapers",
    ]
    assert sum(len(names) for _, names in PACKAGES.values()) == 49


def test_selection_in_a_fake_unpacked_tree(tmp_path):
    root = str(tmp_path)
    aqua = _save(root, "usr/share/backgrounds/mate/nature/Aqua.jpg", (40, 30))
    _save(root, "usr/share/backgrounds/mate/nature/Abstract.jpg", (40, 30))  # not a chosen one
    smarties = _save(root, "usr/share/doc/opencv-doc/examples/data/smarties.png", (20, 16))
    # a photo of the same name elsewhere in the package is not taken
    _save(root, "usr/share/doc/opencv-doc/examples/reg/home.png", (16, 16))
    home = _save(root, "usr/share/doc/opencv-doc/examples/data/home.jpg", (32, 24))
    images = "usr/share/wallpapers/Kite/contents/images"
    _save(root, f"{images}/640x480.jpg", (64, 48))
    kite = _save(root, f"{images}/1920x1080.jpg", (192, 108))
    _save(root, f"{images}/800x600.jpg", (80, 60))

    assert find_source(root, "plasma-workspace-wallpapers", "Kite") == kite  # the largest
    assert find_source(root, "opencv-doc", "smarties") == smarties  # .png where no .jpg
    assert find_source(root, "palapeli-data", "citrus-fruits") is None

    found, missing = select_photos(root)
    assert found == {
        "mate-backgrounds__Aqua.jpg": aqua,
        "opencv-doc__home.jpg": home,
        "opencv-doc__smarties.jpg": smarties,
        "plasma-workspace-wallpapers__Kite.jpg": kite,
    }
    assert len(missing) == 45 and "palapeli-data__citrus-fruits.jpg" in missing

    found, missing = select_photos(root, ["mate-backgrounds"])
    assert list(found) == ["mate-backgrounds__Aqua.jpg"] and len(missing) == 11


def test_resize_keeps_aspect_and_never_enlarges():
    big = Image.new("RGB", (2560, 1600))
    assert resize_photo(big).size == (1024, 640)
    tall = Image.new("RGB", (1365, 1600))
    assert resize_photo(tall).size == (874, 1024)  # rounded, as the study's photos were
    small = Image.new("L", (493, 356))
    out = resize_photo(small)
    assert out.size == (493, 356) and out.mode == "RGB"


def test_write_photo_writes_a_quality_92_jpeg(tmp_path):
    source = _save(str(tmp_path), "src/a.png", (2048, 1000))
    dest = str(tmp_path / "a.jpg")
    assert write_photo(source, dest) == (1024, 500)
    with Image.open(dest) as im:
        assert im.format == "JPEG" and im.size == (1024, 500) and im.mode == "RGB"
    assert not os.path.exists(dest + ".tmp")
