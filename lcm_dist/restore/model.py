"""A trained model loaded from an export (``lcm_dist.export``) for restoration: the frozen
generator, the latent nets and the training latents, checked to fit together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lcm_dist.config import ModelConfig, model_from_dict
from lcm_dist.export import ExportError, open_export
from lcm_dist.model.generator import Generator, set_memory_format
from lcm_dist.model.latent_net import BatchedLatentNet, phi_layout


@dataclass
class RestorationModel:
    """A trained model loaded from an export: frozen generator, latent nets, training latents."""

    url: str
    attrs: dict
    model: ModelConfig
    generator: Generator
    net: BatchedLatentNet
    initial_phi: torch.Tensor
    group: object
    storage_options: dict | None = None
    _rows_by_key: dict | None = None

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def loss(self) -> dict:
        return {"levels": 4, "mse_weight": 1.0, **self.attrs.get("loss", {})}

    @property
    def device(self) -> torch.device:
        return self.initial_phi.device

    def to(self, device: torch.device | str) -> RestorationModel:
        """Move the generator, the latent nets and the initial phi to ``device`` (on a GPU the
        generator's activations are channels_last, as in training: ``set_memory_format``)."""
        self.generator.to(device)
        self.net.to(device)
        self.initial_phi = self.initial_phi.to(device)
        set_memory_format(self.generator, "auto", self.initial_phi.device)
        return self

    def render(self, phi: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) from phi rows (B, P)."""
        return self.generator(self.net(phi.to(self.device)))

    def row_of(self, key_or_row: str | int) -> int:
        """The row of a training image given its row number or its key."""
        n = int(self.attrs["num_images"])
        text = str(key_or_row)
        if text.startswith("-") and text[1:].isdigit():
            raise ValueError(f"row {text} is not a row number (rows are 0 to {n - 1})")
        if text.isdigit():
            row = int(text)
            if row >= n:
                raise ValueError(f"row {row} is outside the export's {n} training images")
            return row
        if self._rows_by_key is None:
            self._rows_by_key = {}
            for row, key in enumerate(self.group["keys"][:]):
                self._rows_by_key.setdefault(str(key), row)
        try:
            return self._rows_by_key[text]
        except KeyError:
            raise ValueError(f"no training image has the key {text!r} in {self.url}") from None

    def reconstruct(self, rows: list[int]) -> torch.Tensor:
        """The generator's reconstructions of training images from their exported latents."""
        latents = self.group["latents"]
        phi = torch.from_numpy(np.stack([np.asarray(latents[r], dtype=np.float32) for r in rows]))
        for r, row in zip(rows, phi, strict=True):
            if not torch.isfinite(row).all():  # a missing chunk reads as NaN
                raise ExportError(f"export {self.url}: the latents of row {r} are missing")
        with torch.no_grad():
            return self.render(phi).cpu()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    url: str, storage_options: dict | None = None, device: str | None = None
) -> RestorationModel:
    """Open an export and rebuild its frozen generator and latent nets on ``device`` (default:
    the GPU if there is one), checking that the pieces fit together."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    group, attrs = open_export(url, storage_options)
    try:
        model = model_from_dict(attrs["model"], f"the model config of export {url}")
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"export {url} has no usable model config ({err})") from None
    layout = phi_layout(model)
    net = BatchedLatentNet(model)
    missing = [a for a in ("latents", "noise", "initial_phi", "keys") if a not in group]
    if missing:
        raise ExportError(f"export {url} lacks the array(s) {', '.join(missing)}; export again")
    num_images = attrs.get("num_images")
    expected = {
        "latents": (num_images, layout.size),
        "keys": (num_images,),
        "initial_phi": (layout.size,),
        "noise": tuple(net.noise.shape),
    }
    if not isinstance(num_images, int) or attrs.get("phi_size") != layout.size:
        raise ExportError(
            f"export {url}: its attributes num_images={num_images!r}, "
            f"phi_size={attrs.get('phi_size')!r} do not fit its model config (phi_size "
            f"{layout.size}); export again"
        )
    for name, shape in expected.items():
        if tuple(group[name].shape) != shape:
            raise ExportError(
                f"export {url}: array {name!r} has shape {tuple(group[name].shape)}, its model "
                f"config needs {shape}; export again"
            )
    loss = attrs.get("loss", {})
    if not isinstance(loss, dict) or set(loss) - {"levels", "mse_weight"}:
        raise ExportError(f"export {url}: its loss settings {loss!r} are not levels/mse_weight")
    generator_file = attrs.get("generator", "generator.safetensors")
    if not isinstance(generator_file, str):
        raise ExportError(f"export {url}: its 'generator' attribute must name a file")
    path = url.rstrip("/") + "/" + generator_file
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            weights = load_safetensors(f.read())
    except FileNotFoundError:
        raise ExportError(f"export {url} has no generator weights ({path} is missing)") from None
    except Exception as err:
        raise ExportError(f"cannot read the generator weights {path}: {err}") from None
    generator = Generator(model)
    try:
        result = generator.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        first = str(err).strip().splitlines()[-1].strip()
        raise ExportError(f"{path} does not fit the export's model config: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{path} does not fit the export's model config (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    generator.eval().requires_grad_(False)
    noise = torch.from_numpy(np.asarray(group["noise"][:], dtype=np.float32))
    initial = torch.from_numpy(np.asarray(group["initial_phi"][:], dtype=np.float32))
    for name, value in (("noise", noise), ("initial_phi", initial)):
        # Missing chunks read as the fill value: an export copied only in part.
        if not torch.isfinite(value).all() or not value.any():
            raise ExportError(f"export {url}: array {name!r} is empty or damaged; export again")
    net.noise.copy_(noise)
    restoration = RestorationModel(
        url, attrs, model, generator, net, initial, group, storage_options
    )
    return restoration.to(device or default_device())
