"""Restoration with a trained LCM: fit a fresh phi per degraded image, the generator frozen.

``load_model`` opens an export (``lcm_dist.export``); ``fit_phi`` fits one phi per image of a
batch at once (the batched latent nets), so many images restore in parallel and each image's
fit is independent of the others (per-image loss, per-image normalization in the latent nets,
and the generator in eval mode: its BatchNorm uses the running statistics of training).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lcm_dist.config import ModelConfig, model_from_dict
from lcm_dist.export import ExportError, open_export
from lcm_dist.model.generator import Generator
from lcm_dist.model.latent_net import BatchedLatentNet, clamp_phi_, phi_layout
from lcm_dist.restore.degrade import Degradation

DEFAULT_ITERATIONS = 500
OPTIMIZERS = ("sgd", "adam")
TASK_DEFAULTS = {"inpaint": ("sgd", 0.5), "superres": ("adam", 0.01), "colorize": ("adam", 0.01)}
"""Optimizer and learning rate on phi per task, chosen on validation crops that are not the
README's test crops. Inpainting fits with plain SGD (the update rule phi gets in training):
Adam moves phi's normalization parameters 10-50x further than SGD (and 100-1000x further than
training did), and the generator fills the hole with texture it never produced in training
(hole PSNR 16.8 dB with Adam at 0.01, 20.0 dB with SGD at 0.5). For super-resolution Adam at
0.01 is as good as SGD at 0.25 and SGD at 1.0 is 2 dB worse."""
OPTIMIZER_LR = {"sgd": 0.25, "adam": 0.01}
"""Learning rate for an optimizer that is not the task's default."""


def fit_settings(task: str, optimizer: str | None = None, lr: float | None = None):
    """(optimizer, lr) on phi for ``task``; ``None`` picks the task's default."""
    default_optimizer, default_lr = TASK_DEFAULTS.get(task, ("adam", OPTIMIZER_LR["adam"]))
    if optimizer is None or optimizer == default_optimizer:
        optimizer = default_optimizer
    elif optimizer in OPTIMIZERS:
        default_lr = OPTIMIZER_LR[optimizer]
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = default_lr if lr is None else lr
    if not lr > 0:
        raise ValueError(f"the learning rate on phi (--lr) must be positive, got {lr}")
    return optimizer, lr


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
        """Move the generator, the latent nets and the initial phi to ``device``."""
        self.generator.to(device)
        self.net.to(device)
        self.initial_phi = self.initial_phi.to(device)
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


def add_fit_arguments(parser, *, task_required: bool) -> None:
    """The command-line options restore.py and evaluate.py share: the export, the task and its
    degradation, and the phi fit."""
    from lcm_dist.restore.degrade import TASKS

    parser.add_argument("--model", required=True, help="export path or URL (launch/export.py)")
    parser.add_argument("--model-options", default="{}", help="fsspec options for --model, JSON")
    parser.add_argument(
        "--device",
        default=default_device(),
        help="where to fit: cpu, cuda or cuda:N (default: %(default)s, the GPU if there is one)",
    )
    parser.add_argument(
        "--task", required=task_required, choices=TASKS, help="the degradation to undo"
    )
    parser.add_argument("--mask", help="inpainting mask file (white = hole)")
    parser.add_argument("--box", type=float, help="centred square hole, fraction of the side")
    parser.add_argument(
        "--random-boxes", type=int, default=0, metavar="N", help="N random rectangular holes"
    )
    parser.add_argument(
        "--random-pixels",
        type=float,
        default=0.0,
        metavar="F",
        help="a fraction F of pixels missing",
    )
    parser.add_argument(
        "--ring-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="inpainting: weight of the MSE term on the observed pixels near a hole (the authors "
        "use 5; %(default)s)",
    )
    parser.add_argument(
        "--ring-width",
        type=int,
        default=0,
        metavar="PX",
        help="inpainting: how far from a hole --ring-weight applies, in pixels (the authors use "
        "5; %(default)s)",
    )
    parser.add_argument(
        "--factor", type=int, default=4, help="super-resolution factor 2, 4 or 8 (%(default)s)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help="iterations of the phi fit (and of DIP, in evaluate.py) (%(default)s)",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="optimizer on phi (default: sgd for inpaint, adam otherwise)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate on phi (default: sgd 0.5 for inpaint, 0.25 otherwise; adam 0.01)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images fitted at once (%(default)s)"
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="inpainting: keep the whole generated image (default: observed pixels put back)",
    )


def settle_fit_arguments(args, restoring: bool = True) -> None:
    """Check the ``add_fit_arguments`` options and, when restoring, fill in the task's default
    optimizer and learning rate (``fit_settings``) in ``args``."""
    if args.iterations < 1 or args.batch_size < 1:
        raise ValueError(
            f"--iterations and --batch-size must be at least 1, got {args.iterations} and "
            f"{args.batch_size}"
        )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(
            f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not (
        torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    ):
        raise ValueError(
            f"--device {args.device}: this machine has {torch.cuda.device_count()} usable CUDA "
            "device(s); use cpu"
        )
    if restoring:
        args.optimizer, args.lr = fit_settings(args.task, args.optimizer, args.lr)


def operator_from_args(args, size: int, count: int, **extra) -> Degradation:
    """The degradation of ``count`` images of ``size`` pixels that the options of
    ``add_fit_arguments`` describe (``extra``: further ``make_operator`` arguments)."""
    from lcm_dist.restore.degrade import make_operator

    return make_operator(
        args.task,
        size,
        count,
        mask=args.mask,
        box=args.box,
        random_boxes=args.random_boxes,
        random_pixels=args.random_pixels,
        factor=args.factor,
        seed=args.seed,
        ring_weight=args.ring_weight,
        ring_width=args.ring_width,
        **extra,
    )


def fit_phi(
    model: RestorationModel,
    observed: torch.Tensor,
    operator: Degradation,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    optimizer: str | None = None,
    lr: float | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one phi per observation (B images at once), the generator frozen; returns
    (restored images (B, C, H, W), phi (B, P)). ``optimizer`` and ``lr`` default per task
    (``fit_settings``).

    Each image's loss is its own data term (summed over the batch, so the images do not
    interact); phi's conv weights are clamped after every step as in training. The fit runs on
    the model's device; the results come back to the CPU."""
    name, lr = fit_settings(operator.name, optimizer, lr)
    observed, operator = observed.to(model.device), operator.to(model.device)
    b = observed.shape[0]
    phi = model.initial_phi.expand(b, -1).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([phi], lr=lr) if name == "sgd" else torch.optim.Adam([phi], lr=lr)
    mask = model.net.mask
    for it in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        per_image = operator.data_term(model.render(phi), observed, **model.loss)
        per_image.sum().backward()
        optimizer.step()
        clamp_phi_(phi, mask, model.model.clamp)
        if on_step is not None:
            on_step(it, per_image.detach())
    with torch.no_grad():
        return model.render(phi).clamp(0, 1).cpu(), phi.detach().cpu()


def iteration_bar(total: int, desc: str):
    """A progress bar over ``total`` image-iterations (1.2M it for big jobs, 50 it for small)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", unit_scale=total >= 10_000, dynamic_ncols=True)


def restore(
    model: RestorationModel,
    observed: torch.Tensor,
    operator: Degradation,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    optimizer: str | None = None,
    lr: float | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Restore many observations in batches of ``batch_size`` (``operator`` covers them all;
    per-image masks are sliced along). Returns (images, phi, seconds)."""
    bar = iteration_bar(observed.shape[0] * iterations, "restore") if progress else None
    start = time.perf_counter()
    images, phis = [], []
    for lo in range(0, observed.shape[0], batch_size):
        part = slice(lo, min(lo + batch_size, observed.shape[0]))
        n = part.stop - part.start

        def tick(it, losses, n=n):
            if bar is not None:
                bar.update(n)
                if it % 20 == 0 or it == iterations - 1:  # the bar ends on the final loss
                    bar.set_postfix(loss=f"{float(losses.mean()):.4f}")

        x, phi = fit_phi(
            model,
            observed[part],
            operator.subset(part),
            iterations=iterations,
            optimizer=optimizer,
            lr=lr,
            on_step=tick,
        )
        images.append(x)
        phis.append(phi)
    if bar is not None:
        bar.close()
    return torch.cat(images), torch.cat(phis), time.perf_counter() - start


def restore_from_args(model: RestorationModel, observed: torch.Tensor, operator: Degradation, args):
    """``restore`` with the fit options of ``add_fit_arguments`` (and the CLIs' ``--quiet``)."""
    return restore(
        model,
        observed,
        operator,
        iterations=args.iterations,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )


def save_latents(path: str, phi: torch.Tensor, names: list[str], attrs: dict) -> None:
    """Fitted phi rows as a Zarr v3 group (array ``latents``, names in the attributes)."""
    import zarr

    group = zarr.open_group(path, mode="w")
    group.create_array("latents", data=phi.numpy().astype(np.float32))
    group.attrs.update({"names": names, **attrs})


def to_png_bytes(image: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] as PNG bytes."""
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def inpainting_preview(
    generator: torch.nn.Module,
    net: BatchedLatentNet,
    model: ModelConfig,
    images: torch.Tensor,
    *,
    iterations: int,
    loss: dict,
) -> tuple[torch.Tensor, float]:
    """Inpaint a centred half-size hole in ``images`` with the generator as it is now (its
    parameters are left untouched: no gradient reaches them, and it runs in eval mode, on its
    BatchNorm running statistics, as restoration does; its train/eval mode is put back after);
    returns (grid of clean / masked / restored rows, mean PSNR over the holes)."""
    from lcm_dist.evaluate.report import psnr
    from lcm_dist.model.latent_net import initial_phi
    from lcm_dist.restore.degrade import Inpaint, box_mask
    from lcm_dist.train.monitor import image_grid

    params = list(generator.parameters())
    flags = [p.requires_grad for p in params]
    was_training = generator.training
    for p in params:
        p.requires_grad_(False)
    generator.eval()
    try:
        device = params[0].device
        preview = RestorationModel(
            "(training)", {"loss": loss}, model, generator, net, initial_phi(model).to(device), None
        )
        op = Inpaint(box_mask(model.image_size, 0.5).to(device))
        images = images.to(device)
        restored, _ = fit_phi(preview, op(images), op, iterations=iterations)
    finally:
        generator.train(was_training)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    hole = op.hole(images.shape[0])[:, 0].cpu()
    score = float(
        np.mean([psnr(restored[i].cpu(), images[i].cpu(), hole[i]) for i in range(len(images))])
    )
    return image_grid([images, op.show(op(images)), restored]), score
