"""WebDataset shards with global row indices, and their manifest.

Sample ``i`` of the input (in the order the sources are given; folders and globs expanded in
sorted order) gets the global row index ``i``: it is the row of the latent store that holds its
phi vector. Shard ``k`` holds rows ``[k * samples_per_shard, (k + 1) * samples_per_shard)``
(the last one may be shorter), so a shard always maps to whole store chunks when the chunk
size divides ``samples_per_shard``.

Layout of an output folder::

    shard-000000.tar      {row:010d}.png + {row:010d}.json ({"row": i, "key": "..."})
    shard-000001.tar
    ...
    keys.txt              line i = key of row i (the source file name, or the caller's key)
    manifest.json         written last; its presence means the set is complete

Every shard is written to a temporary name and renamed when complete, and the manifest goes
last, so an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
from PIL import Image

from lcm_dist.files import (  # noqa: F401 (image-file helpers, also reached from here)
    IMAGE_EXTENSIONS,
    NORMALIZE_MODES,
    RESIZE_MODES,
    collect_sources,
    load_image,
    load_photos,
    make_folder,
    output_folder,
    prepare_image,
)

if TYPE_CHECKING:
    from webdataset import TarWriter

MANIFEST = "manifest.json"
KEYS = "keys.txt"
FORMAT = "lcm-dist-shards"
VERSION = 1
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def open_shard(path: str | os.PathLike) -> TarWriter:
    """A shard file open for ``add_sample`` (close it when done)."""
    from webdataset import TarWriter

    # mtime 0: identical inputs give byte-identical shards.
    return TarWriter(str(path), encoder=False, mtime=0, mode=0o644, user="", group="")


def add_sample(
    tar: TarWriter, row: int, key: str, image: Image.Image | bytes, image_format: str
) -> str:
    """Append sample ``row`` (image, or its encoded bytes, and {"row", "key"} metadata) to an
    open shard; returns the key as recorded (one line)."""
    key = str(key).replace("\n", " ")
    sample = {"__key__": f"{row:010d}", "json": json.dumps({"row": row, "key": key}).encode()}
    data = image if isinstance(image, bytes) else _encode(image, image_format)
    tar.write({**sample, image_format: data})
    return key


def _encoded_sample(item, image_size: int, resize: str, normalize: str, image_format: str):
    """(key, encoded image) of one (key, image or image path) sample, prepared as
    ``prepare_image`` says; in a worker process when ``write_shards`` has several."""
    key, image = item
    if isinstance(image, bytes):
        return key, image  # already encoded in image_format at image_size (the caller's word)
    if isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    try:
        image = prepare_image(image, image_size, resize, normalize)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot convert image {key}: {err}") from None
    return key, _encode(image, image_format)


def write_shards(
    samples: Iterable[tuple[str, Image.Image | str | bytes]],
    out_dir: str | os.PathLike,
    image_size: int,
    samples_per_shard: int,
    *,
    image_format: str = "png",
    progress: bool = True,
    overwrite: bool = False,
    resize: str = "crop",
    normalize: str = "none",
    workers: int = 1,
) -> dict:
    """Write ``samples`` ((key, image, image path or encoded bytes) pairs) as shards in
    ``out_dir``; bytes are written as they are (an image already in ``image_format`` at
    ``image_size``).

    Returns the manifest. Images are made square and resized to ``image_size``, and
    normalized, as ``prepare_image`` says (default: centre-cropped, values kept). With
    ``workers`` > 1, that many processes decode, resize and encode the images, in order: the
    shards, rows and keys are the same as with one.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    prepare_image(Image.new("RGB", (1, 1)), 1, resize, normalize)  # bad modes fail first
    if image_size <= 0 or samples_per_shard <= 0:
        raise ValueError("image_size and samples_per_shard must be positive")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, not {image_format!r}"
        )
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{out} already holds a shard set (manifest.json); pass --overwrite")
    make_folder(out, "shard folder")
    if overwrite:
        for old in list(out.glob("shard-*.tar")) + [out / MANIFEST, out / KEYS]:
            old.unlink(missing_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="shards", unit="img", dynamic_ncols=True)

    shards: list[dict] = []
    keys_tmp = out / (KEYS + ".tmp")
    row = 0
    tar = None
    tmp_path = None
    start = time.perf_counter()
    pool = None
    prepare = functools.partial(
        _encoded_sample,
        image_size=image_size,
        resize=resize,
        normalize=normalize,
        image_format=image_format,
    )
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        encoded = pool.imap(prepare, samples, chunksize=8)
    else:
        encoded = map(prepare, samples)
    try:
        with open(keys_tmp, "w", encoding="utf-8") as keys_file:
            for key, image in encoded:
                if tar is None:
                    # Not webdataset's ShardWriter: it writes under the final names and keeps
                    # no checksums; a shard here gets its name only once complete and hashed.
                    tmp_path = out / (shard_name(len(shards)) + ".tmp")
                    tar = open_shard(tmp_path)
                    shards.append({"name": shard_name(len(shards)), "first_row": row, "count": 0})
                keys_file.write(add_sample(tar, row, key, image, image_format) + "\n")
                shards[-1]["count"] += 1
                row += 1
                if bar is not None:
                    bar.update(1)
                if shards[-1]["count"] == samples_per_shard:
                    _finish_shard(tar, tmp_path, shards[-1])
                    tar = None
            if tar is not None:
                _finish_shard(tar, tmp_path, shards[-1])
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool = None
        # A source that cannot be read stops the set: leave none of its files behind.
        if tar is not None:
            tar.close()
        keys_tmp.unlink(missing_ok=True)
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        for entry in shards:
            (out / entry["name"]).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if bar is not None:
        bar.close()
    if row == 0:
        keys_tmp.unlink()
        raise ValueError("no images to write")
    os.replace(keys_tmp, out / KEYS)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "image_size": image_size,
        "channels": 3,
        "image_format": image_format,
        "samples_per_shard": samples_per_shard,
        "resize": resize,
        "normalize": normalize,
        "num_samples": row,
        "keys_file": KEYS,
        "shards": shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    if progress:
        print(
            f"wrote {row} images in {len(shards)} shards to {out} "
            f"({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    return manifest


def write_pngs(
    samples: Iterable[tuple[str, Image.Image | str]],
    out_dir: str | os.PathLike,
    image_size: int,
    overwrite: bool = False,
    resize: str = "crop",
    normalize: str = "none",
) -> int:
    """Write ``samples`` as ``NNNNNN.png`` files (prepared as ``prepare_image`` says) and
    ``keys.txt``; returns how many."""
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("*.png")) and not overwrite:
        raise ValueError(f"{out} already holds PNG files; pass --overwrite")
    make_folder(out, "image folder")
    keys = []
    for i, (key, image) in enumerate(samples):
        if isinstance(image, str):
            image = load_image(image)
        prepare_image(image, image_size, resize, normalize).save(out / f"{i:06d}.png")
        keys.append(str(key).replace("\n", " "))
    (out / KEYS).write_text("".join(k + "\n" for k in keys))
    return len(keys)


def _finish_shard(tar: TarWriter, tmp_path: Path, entry: dict) -> None:
    tar.close()
    data = tmp_path.read_bytes()
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["bytes"] = len(data)
    os.replace(tmp_path, tmp_path.with_suffix(""))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def load_manifest(shards: str | os.PathLike) -> dict:
    """Read and check the manifest of a shard folder (local path or fsspec URL)."""
    base = str(shards)
    path = join(base, MANIFEST)
    try:
        with fsspec.open(path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"no shard set at {base}: {path} not found (make one with launch/make_shards.py)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"shard manifest {path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lcm-dist shard manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')}; expected {VERSION}")
    expected = 0
    for entry in manifest["shards"]:
        if entry["first_row"] != expected:
            raise ValueError(f"{path}: shard {entry['name']} starts at row {entry['first_row']}")
        expected += entry["count"]
    if expected != manifest["num_samples"]:
        raise ValueError(f"{path}: shard counts add up to {expected}, not num_samples")
    return manifest


def load_keys(shards: str | os.PathLike) -> list[str]:
    """The key of every row (line i of keys.txt is row i)."""
    path = join(str(shards), KEYS)
    with fsspec.open(path, "r", encoding="utf-8") as f:
        return f.read().splitlines()


def verify_shards(shards: str | os.PathLike) -> None:
    """Check every shard's size and SHA-256 against the manifest; raises naming the bad shard."""
    manifest = load_manifest(shards)
    for entry in manifest["shards"]:
        path = join(str(shards), entry["name"])
        digest = hashlib.sha256()
        size = 0
        try:
            with fsspec.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise ValueError(f"shard {path} listed in the manifest is missing") from None
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            raise ValueError(f"shard {path} does not match its manifest checksum (corrupt?)")
