"""The images a fit job reads: a shard set (as ``launch/make_shards.py`` writes it) or image
files, folders and globs, addressed by row (row i = sample i of the shards, or file i in the
order ``collect_sources`` gives).

``read(lo, hi)`` returns rows ``[lo, hi)`` as float tensors in [0, 1]. A shard reader keeps
the one shard it read last decoded in memory (a process reads its rows in order, so each shard
is read once, and memory stays at one shard whatever the input's size).
"""

from __future__ import annotations

import io
import tarfile

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class InputError(ValueError):
    """An input that cannot be used, named in one line."""


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / 255.0)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


class ShardInputs:
    """The samples of a shard set, by row."""

    def __init__(self, folder: str):
        from lcm_dist.data.shards import load_keys, load_manifest

        self.folder = folder
        self.manifest = load_manifest(folder)
        self.keys = load_keys(folder)
        self.count = int(self.manifest["num_samples"])
        if len(self.keys) != self.count:
            raise InputError(
                f"shard set {folder}: keys.txt has {len(self.keys)} lines for {self.count} samples"
            )
        self.image_size = int(self.manifest["image_size"])
        self.image_format = self.manifest.get("image_format", "png")
        self._shard: tuple[int, np.ndarray] | None = None  # (first row, decoded images)

    def describe(self) -> dict:
        return {"shards": self.folder, "count": self.count}

    def _decoded(self, entry: dict, mode: str) -> np.ndarray:
        from lcm_dist.data.shards import join

        first = int(entry["first_row"])
        if self._shard is not None and self._shard[0] == first:
            return self._shard[1]
        url = join(self.folder, entry["name"])
        images: list[np.ndarray | None] = [None] * int(entry["count"])
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    name = member.name
                    if not name.endswith("." + self.image_format):
                        continue
                    data = tar.extractfile(member).read()
                    row = int(name.split(".")[0]) - first
                    if not 0 <= row < len(images):
                        raise InputError(f"shard {url} holds {name}, outside its rows")
                    images[row] = _decode(data, f"{name} in shard {url}", self.image_size, mode)
        except FileNotFoundError:
            raise InputError(f"shard {url} listed in the manifest is missing") from None
        except (tarfile.TarError, EOFError) as err:
            raise InputError(f"shard {url} is not a readable tar file ({err})") from None
        missing = [first + i for i, image in enumerate(images) if image is None]
        if missing:
            raise InputError(f"shard {url} lacks the image of row {missing[0]}")
        self._shard = (first, np.stack(images))
        return self._shard[1]

    def read(self, lo: int, hi: int, mode: str = "RGB", side: int | None = None) -> torch.Tensor:
        if side is not None and side != self.image_size:
            raise InputError(
                f"shard set {self.folder} holds {self.image_size}x{self.image_size} images; "
                f"this fit takes {side}x{side}"
            )
        parts = []
        for entry in self.manifest["shards"]:
            first, count = int(entry["first_row"]), int(entry["count"])
            a, b = max(lo, first), min(hi, first + count)
            if a < b:
                parts.append(self._decoded(entry, mode)[a - first : b - first])
        return torch.stack([_to_tensor(a) for a in np.concatenate(parts)])


class FileInputs:
    """Image files (files, folders and globs, expanded as ``collect_sources`` does), by row."""

    def __init__(self, sources: list[str]):
        from lcm_dist.files import collect_sources

        self.paths = collect_sources(sources)
        self.keys = list(self.paths)
        self.count = len(self.paths)

    def describe(self) -> dict:
        return {"files": self.count, "first": self.paths[0] if self.paths else None}

    def read(self, lo: int, hi: int, mode: str = "RGB", side: int | None = None) -> torch.Tensor:
        images = []
        for path in self.paths[lo:hi]:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:
                raise InputError(f"cannot read image {path}: {err.strerror or err}") from None
            images.append(_to_tensor(_decode(data, f"image {path}", side, mode)))
        return torch.stack(images)


def _decode(data: bytes, where: str, side: int | None, mode: str) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 pixels of an encoded image; one-line errors naming it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if side is not None and im.size != (side, side):
                raise InputError(f"{where} is {im.size[0]}x{im.size[1]}, expected {side}x{side}")
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(f"{where} is not a decodable image") from None
    except (OSError, SyntaxError) as err:
        raise InputError(f"{where} cannot be decoded: {err}") from None


def open_inputs(sources: list[str]):
    """``ShardInputs`` for a single shard folder (it holds a manifest), else ``FileInputs``."""
    from lcm_dist.data.shards import MANIFEST, join

    if len(sources) == 1:
        fs, path = fsspec.core.url_to_fs(join(sources[0], MANIFEST))
        if fs.exists(path):
            return ShardInputs(sources[0])
    inputs = FileInputs(sources)
    if inputs.count == 0:
        raise InputError(f"no images found in {' '.join(sources)}")
    return inputs


def row_masks(folder: str, names: list[str], side: int) -> torch.Tensor:
    """Per-image inpainting masks (B, 1, side, side), 1 = known, from ``folder/<name>.png``
    (white = hole, read by ``mask_from_file``); one line naming a missing or wrong mask."""
    import os

    from lcm_dist.restore.degrade import mask_from_file

    masks = []
    for name in names:
        path = os.path.join(folder, name + ".png")
        if not os.path.isfile(path):
            raise InputError(f"no mask for input {name!r}: {path} does not exist")
        known = mask_from_file(path, side)[0]
        if not known.any() or known.all():
            what = "all hole" if not known.any() else "without a hole (white pixels)"
            raise InputError(f"mask {path} is {what}")
        masks.append(known)
    return torch.stack(masks)
