"""The output of a fit job (``job.py``), a local folder or an fsspec URL::

    latents.zarr/   latents (N, P) float32, row i = the fitted phi of input row i (the model's
                    row layout, as an export's latents); loss (N,) each image's final data
                    term; psnr (N,) PSNR in dB against the clean input (clean inputs only);
                    keys (N,) the input keys; attrs: the fit's settings
    images/         the restored (or, for --task embed, reconstructed) images as PNG files
    done/           one marker per committed unit
    tb/             TensorBoard scalars (process 0)

A unit's results are written first, then its marker: the marker is the commit.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np

from lcm_dist.faults import fail_point
from lcm_dist.restore.inputs import InputError

FORMAT = "lcm-dist-fit"
VERSION = 1


def _join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


class FitOutput:
    """The output folder of a fit: its Zarr group, images and commit markers."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.options)
        self.group = None
        self._folders = False

    def marker(self, unit: int) -> str:
        return _join(self.root, "done", f"unit-{unit:08d}.json")

    def create_or_check(self, attrs: dict, keys: list[str], phi_size: int, chunk: int) -> None:
        """Create the output for a new fit, or check that an existing one is this fit's."""
        from lcm_dist.latents.zarr_groups import open_group_v3

        zarr_url = _join(self.url, "latents.zarr")
        n = len(keys)
        try:
            group = open_group_v3(zarr_url, "r+", self.options)
        except FileNotFoundError:
            group = None
        if group is not None:
            self._check(dict(group.attrs), attrs)
            self.group = group
            return
        if self.fs.exists(_join(self.root, "done")) and self.fs.ls(_join(self.root, "done")):
            raise InputError(
                f"{self.url} holds commit markers but no latents.zarr; use a new --out"
            )
        group = open_group_v3(zarr_url, "w", self.options)
        group.create_array("keys", shape=(n,), chunks=(min(n, 1 << 16),), dtype=str)
        group["keys"][:] = np.asarray(keys, dtype=object)
        nan = float("nan")  # a row never written reads as NaN, not as a valid phi
        for name, shape, chunks in (
            ("latents", (n, phi_size), (chunk, phi_size)),
            ("loss", (n,), (chunk,)),
            ("psnr", (n,), (chunk,)),
        ):
            group.create_array(name, shape=shape, chunks=chunks, dtype="float32", fill_value=nan)
        group.attrs.put(attrs)  # last: an output with attributes is complete
        self.group = group

    def _check(self, stored: dict, attrs: dict) -> None:
        if stored.get("format") != FORMAT:
            raise InputError(f"{self.url} is not the output of a fit (no {FORMAT!r} format)")

        def flat(d: dict) -> dict:
            out = {}
            for key, value in d.items():
                if key in ("format", "version", "complete"):
                    continue
                if isinstance(value, dict):
                    out.update({f"{key}.{k}": v for k, v in flat(value).items()})
                else:
                    out[key] = value
            return out

        old, new = flat(stored), flat(attrs)
        # The task first: a different task is the difference to name, not what it implies
        for key in sorted(set(old) | set(new), key=lambda k: (k != "settings.task", k)):
            if old.get(key) != new.get(key):
                raise InputError(
                    f"{self.url} belongs to another fit ({key} is {old.get(key)!r} there, "
                    f"{new.get(key)!r} now); re-run with its settings or choose another --out"
                )

    def open(self) -> None:
        from lcm_dist.latents.zarr_groups import open_group_v3

        self.group = open_group_v3(_join(self.url, "latents.zarr"), "r+", self.options)

    def write_image_manifest(
        self, markers: dict[int, dict], keys: list[str], image_size: int, batch_size: int
    ) -> None:
        """With every unit committed (``markers``, from ``committed``) and ``--images
        shards``: ``images/`` becomes a shard set (its keys.txt, then its manifest, from the
        units' markers), which training and ``launch/fit.py`` read like any."""
        from lcm_dist.data.shards import FORMAT as SHARDS
        from lcm_dist.data.shards import KEYS, MANIFEST
        from lcm_dist.data.shards import VERSION as SHARDS_VERSION

        entries = sorted((m["shard"] for m in markers.values()), key=lambda e: e["first_row"])
        images = _join(self.root, "images")
        self.fs.pipe_file(_join(images, KEYS), "".join(k + "\n" for k in keys).encode())
        manifest = {
            "format": SHARDS,
            "version": SHARDS_VERSION,
            "image_size": image_size,
            "channels": 3,
            "image_format": "png",
            "samples_per_shard": batch_size,
            "num_samples": len(keys),
            "keys_file": KEYS,
            "shards": entries,
        }
        self.fs.pipe_file(_join(images, MANIFEST), json.dumps(manifest, indent=1).encode())

    def committed(self) -> dict[int, dict]:
        """{unit: its marker} of the units whose marker is there and readable."""
        folder = _join(self.root, "done")
        if not self.fs.exists(folder):
            return {}
        done = {}
        for path in self.fs.ls(folder, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("unit-") and name.endswith(".json"):
                try:
                    done[int(name[5:13])] = json.loads(self.fs.cat_file(path))
                except (ValueError, OSError):
                    continue  # a marker cut short by a crash: the unit is fitted again
        return done

    def write_unit(self, unit: int, lo: int, hi: int, result: dict, images: dict) -> None:
        """Write a unit's rows and images, then its marker (the commit)."""
        group = self.group
        if not self._folders:
            for name in ("images", "done"):
                self.fs.makedirs(_join(self.root, name), exist_ok=True)
            self._folders = True
        fail_point("fit.write_unit")
        group["latents"][lo:hi] = result["phi"]
        group["loss"][lo:hi] = result["loss"]
        if result.get("psnr") is not None:
            group["psnr"][lo:hi] = result["psnr"]
        for name, data in images.items():
            self.fs.pipe_file(_join(self.root, "images", name), data)
        marker = {"unit": unit, "rows": [lo, hi], "seconds": result["seconds"]}
        if "shard" in result:
            marker["shard"] = result["shard"]
        tmp = self.marker(unit) + ".tmp"
        self.fs.pipe_file(tmp, json.dumps(marker).encode())
        self.fs.mv(tmp, self.marker(unit))
