"""Shard writer: row indices, manifest, checksums, and errors on bad sources."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from lcm_dist.data.shards import (
    collect_sources,
    load_keys,
    load_manifest,
    prepare_image,
    verify_shards,
    write_pngs,
    write_shards,
)


def _images(count, size=20, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield f"img{i}", Image.fromarray(rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8))


def test_round_trip_rows_keys_and_manifest(tmp_path):
    manifest = write_shards(_images(11), tmp_path, 16, 4, progress=False)
    assert manifest["num_samples"] == 11
    assert [(s["first_row"], s["count"]) for s in manifest["shards"]] == [(0, 4), (4, 4), (8, 3)]
    assert load_manifest(tmp_path) == manifest
    assert load_keys(tmp_path) == [f"img{i}" for i in range(11)]
    verify_shards(tmp_path)
    rows = []
    for entry in manifest["shards"]:
        with tarfile.open(tmp_path / entry["name"]) as tar:
            names = sorted(tar.getnames())
            for name in names:
                data = tar.extractfile(name).read()
                if name.endswith(".json"):
                    meta = json.loads(data)
                    assert name == f"{meta['row']:010d}.json"
                    rows.append(meta["row"])
                else:
                    assert Image.open(io.BytesIO(data)).size == (16, 16)
    assert rows == list(range(11))


def test_shards_are_byte_identical_for_identical_input(tmp_path):
    a = write_shards(_images(5), tmp_path / "a", 8, 2, progress=False)
    b = write_shards(_images(5), tmp_path / "b", 8, 2, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_shards(_images(3), tmp_path, 8, 2, progress=False)
    with pytest.raises(ValueError, match="already holds a shard set"):
        write_shards(_images(3), tmp_path, 8, 2, progress=False)
    manifest = write_shards(_images(2), tmp_path, 8, 2, progress=False, overwrite=True)
    assert manifest["num_samples"] == 2 and len(list(tmp_path.glob("shard-*.tar"))) == 1


def test_prepare_image_centre_crops():
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, 10:20] = 255  # the centre square is white, the sides black
    out = prepare_image(Image.fromarray(arr), 10)
    assert out.size == (10, 10) and np.asarray(out).min() == 255


def test_verify_detects_corruption(tmp_path):
    manifest = write_shards(_images(4), tmp_path, 8, 2, progress=False)
    path = tmp_path / manifest["shards"][1]["name"]
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000001.tar does not match"):
        verify_shards(tmp_path)


def test_collect_sources_order_and_errors(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.png", "d/a.jpg", "d/sub/c.png", "x.png"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    files = collect_sources([str(tmp_path / "x.png"), str(tmp_path / "d")])
    rel = [f.replace(str(tmp_path) + "/", "") for f in files]
    assert rel == ["x.png", "d/a.jpg", "d/b.png", "d/sub/c.png"]
    assert len(collect_sources([str(tmp_path / "d" / "*.png")])) == 1
    with pytest.raises(ValueError, match=r"'.*nothing\*\.png' matches no image"):
        collect_sources([str(tmp_path / "nothing*.png")])
    with pytest.raises(ValueError, match="does not exist"):
        collect_sources([str(tmp_path / "missing")])


def test_undecodable_source_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    good = list(_images(3, size=8))
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        write_shards([*good, ("broken", str(bad))], tmp_path / "out", 8, 2, progress=False)
    # Nothing of the stopped set is left: no manifest, no finished shard, no temporary file.
    assert list((tmp_path / "out").iterdir()) == []


def test_output_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    samples = list(_images(2, size=8))
    with pytest.raises(ValueError, match=r"the shard folder .*a-file is a file, not a folder"):
        write_shards(samples, tmp_path / "a-file", 8, 2, progress=False)
    with pytest.raises(ValueError, match=r"cannot create the image folder .*a-file/x: not a dir"):
        write_pngs(samples, tmp_path / "a-file" / "x", 8)


def test_make_shards_cli(tmp_path, cli):
    src = tmp_path / "photos"
    src.mkdir()
    for i, (_, im) in enumerate(_images(5, size=24)):
        im.save(src / f"p{i}.png")
    args = ["--image-size", "16", "--samples-per-shard", "2", "--quiet", "--verify"]
    done = cli("make_shards", src, "--out", tmp_path / "s", *args)
    assert done.returncode == 0, done.stderr
    assert load_manifest(tmp_path / "s")["num_samples"] == 5
    bad = cli("make_shards", tmp_path / "no*.png", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "matches no image files" in bad.stderr


def test_make_shards_random_crops_with_held_out_photos(tmp_path, cli):
    src = tmp_path / "photos"
    src.mkdir()
    for i, (_, im) in enumerate(_images(4, size=96)):
        im.save(src / f"{'test' if i == 3 else 'train'}-{i}.png")
    common = ["--image-size", "16", "--quiet", "--random-crops", "9", "--seed", "3"]
    done = cli("make_shards", src, "--exclude", "test-*", "--out", tmp_path / "s", *common)
    assert done.returncode == 0, done.stderr
    assert load_manifest(tmp_path / "s")["num_samples"] == 9
    keys = load_keys(tmp_path / "s")
    assert {k.split("#")[0] for k in keys} == {str(src / f"train-{i}.png") for i in range(3)}
    assert all(re.fullmatch(r".*train-\d\.png#crop\d@\d+,\d+,\d+", k) for k in keys), keys
    done = cli("make_shards", src / "test-3.png", "--png", "--out", tmp_path / "png", *common)
    assert done.returncode == 0, done.stderr
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 9 and Image.open(pngs[0]).size == (16, 16)
    assert all("test-3" in k for k in (tmp_path / "png" / "keys.txt").read_text().splitlines())


def test_the_authors_celeba_preparation_squashes_and_stretches_each_image(tmp_path, cli):
    from lcm_dist.data.loader import ShardLoader

    src = tmp_path / "faces"
    src.mkdir()
    # A 40x20 image with values 50 (columns 0-29) and 150 (columns 30-39).
    wide = np.full((20, 40, 3), 50, dtype=np.uint8)
    wide[:, 30:] = 150
    Image.fromarray(wide).save(src / "a.png")
    args = ["--image-size", "16", "--quiet", "--resize", "squash", "--normalize", "minmax"]
    done = cli("make_shards", src, "--out", tmp_path / "s", *args)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(tmp_path / "s")
    assert (manifest["resize"], manifest["normalize"]) == ("squash", "minmax")
    pixels = next(iter(ShardLoader(str(tmp_path / "s"), batch_size=1))).pixels[0].numpy()
    # Squashed, not cropped: the bright quarter is still there (4 of the 16 columns), and the
    # values span 0-255 (Lanczos rings a little at the step, so the extremes lie there).
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels[:, :10] < 20).all() and (pixels[:, 13:] > 235).all()
    # The default crops the centre square (columns 10-29): all dark, values kept.
    done = cli("make_shards", src, "--out", tmp_path / "c", "--image-size", "16", "--quiet")
    assert done.returncode == 0, done.stderr
    pixels = next(iter(ShardLoader(str(tmp_path / "c"), batch_size=1))).pixels[0].numpy()
    assert (pixels == 50).all()


def test_an_unknown_preparation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="resize must be one of crop, squash, not 'stretch'"):
        write_shards(_images(1, size=8), tmp_path / "s", 8, 2, progress=False, resize="stretch")


def test_several_workers_write_the_same_shards_as_one(tmp_path):
    from lcm_dist.data.demo import demo_photos
    from lcm_dist.data.shards import write_shards

    sources = tmp_path / "photos"
    sources.mkdir()
    for name, array in demo_photos()[:6]:
        Image.fromarray(array).save(sources / f"{name}.png")
    samples = [(str(p), str(p)) for p in sorted(sources.glob("*.png"))] * 3
    one = write_shards(samples, tmp_path / "one", 32, 5, progress=False)
    two = write_shards(samples, tmp_path / "two", 32, 5, progress=False, workers=2)
    assert one["shards"] == two["shards"]  # names, rows, counts, sizes and SHA-256
    assert (tmp_path / "one" / "keys.txt").read_bytes() == (
        tmp_path / "two" / "keys.txt"
    ).read_bytes()
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        write_shards(samples, tmp_path / "three", 32, 5, progress=False, workers=0)
