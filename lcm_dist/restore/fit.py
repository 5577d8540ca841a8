"""Restoration with a trained LCM: fit a fresh phi per degraded image, the generator frozen.

``fit_phi`` fits one phi per image of a batch at once (the batched latent nets), so many images
restore in parallel and each image's fit is independent of the others (per-image loss,
per-image normalization in the latent nets, and the generator in eval mode: its BatchNorm uses
the running statistics of training). ``restore`` runs it over many images in batches. The model
comes from ``lcm_dist.restore.model.load_model``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from lcm_dist.memory import keep_freed_memory
from lcm_dist.model.latent_net import clamp_phi_
from lcm_dist.restore.degrade import Degradation
from lcm_dist.restore.model import RestorationModel

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


INITS = ("default", "mean", "nearest")
"""Where each image's phi starts: the authors' seed-42 init every training image started from
(``default``), the mean of the trained phi (``mean``), or the trained phi, among
``NEAREST_CANDIDATES`` training images spread evenly over the export's rows, whose generated
image has the lowest data term against the observation (``nearest``)."""
NEAREST_CANDIDATES = 256
TASK_INITS = {"inpaint": "mean", "colorize": "nearest"}
"""The start per task when none is given (``default`` otherwise), chosen on validation crops
(docs/results.md): hole PSNR +0.22 dB from the mean for inpainting, +0.47 dB from the nearest
for colorization; super-resolution gained nothing from either."""
TASK_FINISH = {"inpaint": "consistent", "superres": "consistent", "colorize": "consistent"}
"""How each task's output is made from the generated image (``degrade.finish``) when no
``--finish`` is given, chosen on validation crops (docs/results.md): super-resolution +1.16
dB, colorization +0.27 dB against the raw generated image (250 iterations); inpainting has
always put the observed pixels back."""
TASK_ITERATIONS = {"inpaint": 100, "superres": 250, "colorize": 250}
"""Phi iterations per task when none are given (``DEFAULT_ITERATIONS`` otherwise), chosen on
validation crops (docs/results.md): inpainting's hole got worse the longer phi fitted the
observed pixels (20.71, 20.50, 20.18 and 19.84 dB after 100, 250, 500 and 1,000), and
super-resolution and colorization gained nothing after 250."""


def _candidates(model: RestorationModel, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi (K, P), their generated images (K, C, H, W)) of ``count`` training images at
    evenly spaced rows of the export, on the model's device; computed once per model."""
    cache = getattr(model, "_nearest_cache", None)
    if cache is not None and cache[0] == count:
        return cache[1], cache[2]
    n = int(model.attrs["num_images"])
    rows = sorted({int(r) for r in np.linspace(0, n - 1, min(count, n))})
    latents = model.group["latents"]
    phi = torch.from_numpy(np.asarray(latents.oindex[np.asarray(rows), :], dtype=np.float32))
    phi = phi.to(model.device)
    with torch.no_grad():
        images = torch.cat([model.render(phi[i : i + 64]) for i in range(0, len(rows), 64)])
    model._nearest_cache = (count, phi, images)
    return phi, images


def mean_phi(model: RestorationModel) -> torch.Tensor:
    """The mean of the export's trained phi (P,), streamed over its rows; computed once."""
    cached = getattr(model, "_mean_phi", None)
    if cached is not None:
        return cached
    latents = model.group["latents"]
    n = int(model.attrs["num_images"])
    total = np.zeros(latents.shape[1], dtype=np.float64)
    step = max(1, latents.chunks[0])
    for lo in range(0, n, step):
        total += np.asarray(latents[lo : min(lo + step, n)], dtype=np.float64).sum(0)
    model._mean_phi = torch.from_numpy((total / n).astype(np.float32)).to(model.device)
    return model._mean_phi


def starting_phi(
    model: RestorationModel,
    observed: torch.Tensor,
    operator: Degradation,
    init: str = "default",
    candidates: int = NEAREST_CANDIDATES,
) -> torch.Tensor:
    """Each image's starting phi (B, P) on the model's device (``INITS``). ``nearest`` picks per
    image, so an image's start does not depend on the rest of its batch."""
    batch = observed.shape[0]
    if init == "default":
        return model.initial_phi.expand(batch, -1).clone()
    if init == "mean":
        return mean_phi(model).expand(batch, -1).clone()
    if init != "nearest":
        raise ValueError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    phi, images = _candidates(model, candidates)
    observed = observed.to(model.device)
    picks = []
    with torch.no_grad():
        for b in range(batch):
            one = operator.subset(slice(b, b + 1))
            y = observed[b : b + 1].expand(images.shape[0], *observed.shape[1:])
            picks.append(int(one.data_term(images, y, **model.loss).argmin()))
    return phi[picks].clone()


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


def fit_phi(
    model: RestorationModel,
    observed: torch.Tensor,
    operator: Degradation,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    optimizer: str | None = None,
    lr: float | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    return_loss: bool = False,
    init: str = "default",
    refine: int = 0,
    refine_lr: float = 1e-4,
) -> tuple[torch.Tensor, ...]:
    """Fit one phi per observation (B images at once), the generator frozen; returns
    (restored images (B, C, H, W), phi (B, P)), and with ``return_loss`` each image's data
    term at that phi (B,). ``optimizer`` and ``lr`` default per task (``fit_settings``).

    Each image's loss is its own data term (summed over the batch, so the images do not
    interact); phi's conv weights are clamped after every step as in training. Each image
    keeps the phi with the lowest data term the fit met (``FitState``), its starting phi
    included, so a fit never ends worse than it started on its own objective, and where the
    path wanders (a step of the default Adam moves phi by up to the whole clamp range) the
    result is the best point of it rather than wherever the last step landed. The fit runs on
    the model's device; the results come back to the CPU."""
    name, lr = fit_settings(operator.name, optimizer, lr)
    keep_freed_memory(model.device)  # on the CPU an iteration reuses the pages the last freed
    observed, operator = observed.to(model.device), operator.to(model.device)
    start = starting_phi(model, observed, operator, init)
    state = FitState(model, start, name, lr)
    for it in range(iterations):
        per_image = state.step(observed, operator)
        if on_step is not None:
            on_step(it, per_image)
    with torch.no_grad():
        state.keep_best(operator.data_term(model.render(state.phi), observed, **model.loss))
        images = model.render(state.best_phi).clamp(0, 1).cpu()
    if refine:
        images = refine_generator(model, observed, operator, state.best_phi, refine, refine_lr)
    if return_loss:
        return images, state.best_phi.cpu(), state.best_loss.cpu()
    return images, state.best_phi.cpu()


def refine_generator(
    model: RestorationModel,
    observed: torch.Tensor,
    operator: Degradation,
    phi: torch.Tensor,
    iterations: int,
    lr: float,
) -> torch.Tensor:
    """Joint refinement: for each image, a copy of the generator (BatchNorm still in eval
    mode) and its fitted phi fine-tuned together on that one observation for ``iterations``
    Adam steps at ``lr`` (phi clamped as always); the generator adapts to the image from the
    prior that training gave it. Returns the images (B, C, H, W) on the CPU; the model is
    unchanged. Each image keeps its best iterate on its data term, its start included."""
    import copy

    out = []
    for b in range(observed.shape[0]):
        generator = copy.deepcopy(model.generator).requires_grad_(True)
        one_phi = phi[b : b + 1].detach().clone().requires_grad_(True)
        y, op = observed[b : b + 1], operator.subset(slice(b, b + 1))
        optimizer = torch.optim.Adam([*generator.parameters(), one_phi], lr=lr)
        best, best_loss = None, float("inf")
        for _ in range(iterations + 1):
            optimizer.zero_grad(set_to_none=True)
            x = generator(model.net(one_phi))
            loss = op.data_term(x, y, **model.loss).sum()
            if float(loss.detach()) < best_loss:
                best, best_loss = x.detach().clamp(0, 1).cpu(), float(loss.detach())
            loss.backward()
            optimizer.step()
            clamp_phi_(one_phi, model.net.mask, model.model.clamp)
        out.append(best)
    return torch.cat(out)


class FitState:
    """One batch's fit: its phi, optimizer and, per image, the best phi met so far.

    ``step`` is one iteration; it copies nothing from the host and reads nothing back, so
    iterations queue on a GPU without waiting for it."""

    def __init__(
        self, model: RestorationModel, start: torch.Tensor | int, optimizer: str, lr: float
    ):
        """``start``: each image's starting phi (B, P), or B images from the default init."""
        self.model = model
        if isinstance(start, int):
            start = model.initial_phi.expand(start, -1)
        batch = start.shape[0]
        self.phi = start.detach().clone().requires_grad_(True)
        self.optimizer = (
            torch.optim.SGD([self.phi], lr=lr)
            if optimizer == "sgd"
            else torch.optim.Adam([self.phi], lr=lr)
        )
        self.best_phi = self.phi.detach().clone()
        self.best_loss = torch.full((batch,), float("inf"), device=self.phi.device)

    def keep_best(self, per_image: torch.Tensor) -> None:
        """Remember the current phi of the images whose data term ``per_image`` (of the
        current phi) is their lowest yet."""
        better = per_image < self.best_loss  # NaN never is
        self.best_loss = torch.where(better, per_image, self.best_loss)
        self.best_phi = torch.where(better[:, None], self.phi.detach(), self.best_phi)

    def step(self, observed: torch.Tensor, operator: Degradation) -> torch.Tensor:
        """One iteration; returns the data term per image of phi before it (detached)."""
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        per_image = operator.data_term(model.render(self.phi), observed, **model.loss)
        per_image.sum().backward()
        per_image = per_image.detach()
        with torch.no_grad():
            self.keep_best(per_image)
        self.optimizer.step()
        clamp_phi_(self.phi, model.net.mask, model.model.clamp)
        return per_image


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
    init: str = "default",
    refine: int = 0,
    refine_lr: float = 1e-4,
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
                if it == iterations - 1:  # read once per batch: a read waits for the device
                    bar.set_postfix(loss=f"{float(losses.mean()):.4f}")

        x, phi = fit_phi(
            model,
            observed[part],
            operator.subset(part),
            iterations=iterations,
            optimizer=optimizer,
            lr=lr,
            on_step=tick,
            init=init,
            refine=refine,
            refine_lr=refine_lr,
        )
        images.append(x)
        phis.append(phi)
    if bar is not None:
        bar.close()
    return torch.cat(images), torch.cat(phis), time.perf_counter() - start
