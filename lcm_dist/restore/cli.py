"""The command-line side of restoration, shared by launch/restore.py and launch/evaluate.py:
the export, task, degradation and fit options, and writing fitted latents."""

from __future__ import annotations

import numpy as np
import torch

from lcm_dist.restore.degrade import FINISHES, Degradation
from lcm_dist.restore.fit import (
    DEFAULT_ITERATIONS,
    INITS,
    OPTIMIZERS,
    TASK_FINISH,
    TASK_INITS,
    TASK_ITERATIONS,
    fit_settings,
    restore,
)
from lcm_dist.restore.model import RestorationModel, default_device


def add_fit_arguments(parser, *, task_required: bool, tasks: tuple[str, ...] | None = None) -> None:
    """The command-line options restore.py, evaluate.py and fit.py share: the export, the task
    (one of ``tasks``, default the degradations) and its degradation, and the phi fit."""
    from lcm_dist.restore.degrade import TASKS

    tasks = tasks or TASKS

    parser.add_argument("--model", required=True, help="export path or URL (launch/export.py)")
    parser.add_argument("--model-options", default="{}", help="fsspec options for --model, JSON")
    parser.add_argument(
        "--device",
        default=default_device(),
        help="where to fit: cpu, cuda or cuda:N (default: %(default)s, the GPU if there is one)",
    )
    parser.add_argument(
        "--task",
        required=task_required,
        choices=tasks,
        help="the degradation to undo"
        + ("" if task_required else " (required with images to restore)"),
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
        help="iterations of the phi fit (and of DIP, in evaluate.py); default: "
        + ", ".join(f"{v} for {k}" for k, v in TASK_ITERATIONS.items())
        + f", {DEFAULT_ITERATIONS} otherwise",
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
        "--init",
        choices=INITS,
        help="where each phi starts: the seed-42 init of training, the mean trained phi, or the "
        "trained phi whose image is nearest the observation (of 256 spread over the export); "
        "default: mean for inpaint, nearest for colorize, default otherwise",
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="joint refinement: after the phi fit, N Adam steps on a per-image copy of the "
        "generator and phi (restore.py, evaluate.py; 0: off)",
    )
    parser.add_argument(
        "--refine-lr", type=float, default=1e-4, help="Adam lr of --refine (%(default)s)"
    )
    parser.add_argument(
        "--recipe",
        choices=("authors",),
        help="authors: their inpainting fit (SGD at lr 0.02 per image, 3,001 iterations, ring "
        "weight 5 over 5 pixels, the raw generated image); sets those options",
    )
    parser.add_argument(
        "--finish",
        choices=FINISHES,
        help="how the generated image becomes the output: raw (as generated), consistent (made "
        "to agree with the observation: inpainting puts the observed pixels back, "
        "super-resolution moves each block's mean to its observed pixel, colorization sets the "
        "luma to the observed one and keeps the generated colour); default: "
        + ", ".join(f"{v} for {k}" for k, v in TASK_FINISH.items()),
    )
    parser.add_argument("--raw", action="store_true", help="the same as --finish raw")


def settle_fit_arguments(args, restoring: bool = True) -> None:
    """Check the ``add_fit_arguments`` options and fill in the task's defaults in ``args``:
    iterations, start and finish, and when restoring the optimizer and learning rate
    (``fit_settings``)."""
    if args.iterations is None:
        args.iterations = TASK_ITERATIONS.get(args.task, DEFAULT_ITERATIONS)
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
    if args.refine < 0 or not args.refine_lr > 0:
        raise ValueError(
            f"--refine must be >= 0 and --refine-lr positive, got {args.refine} and "
            f"{args.refine_lr}"
        )
    if args.raw:
        if args.finish not in (None, "raw"):
            raise ValueError(f"--raw and --finish {args.finish} contradict each other")
        args.finish = "raw"
    if getattr(args, "recipe", None) == "authors":
        # The authors fit 50 images at SGD lr 1.0 on the batch's mean loss: lr 0.02 on each
        # image's own loss (REFERENCE.md).
        args.optimizer, args.lr, args.iterations = "sgd", 0.02, 3001
        args.finish = "raw"
        if getattr(args, "init", None) is None:
            args.init = "default"  # their seed-42 start
        if args.task == "inpaint":
            args.ring_weight, args.ring_width = 5.0, 5
    if restoring:
        args.optimizer, args.lr = fit_settings(args.task, args.optimizer, args.lr)
    if getattr(args, "init", None) is None:
        args.init = TASK_INITS.get(args.task, "default")
    if args.finish is None:
        args.finish = TASK_FINISH.get(args.task, "raw")


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
        init=args.init,
        refine=args.refine,
        refine_lr=args.refine_lr,
    )


def save_latents(path: str, phi: torch.Tensor, names: list[str], attrs: dict) -> None:
    """Fitted phi rows as a Zarr v3 group (array ``latents``, names in the attributes)."""
    import zarr

    group = zarr.open_group(path, mode="w")
    group.create_array("latents", data=phi.numpy().astype(np.float32))
    group.attrs.update({"names": names, **attrs})
