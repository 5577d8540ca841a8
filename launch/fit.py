"""Fit a fresh phi for each of many images with a trained model (the generator frozen):
embed clean images, or restore degraded ones, from shards or image files, on one process or
many, resumable.

    python launch/fit.py --model exports/photos64.zarr --task embed data/shards --out fits/emb
    python launch/fit.py --model M --task inpaint --box 0.5 data/shards --out fits/inpaint
    python launch/fit.py --model M --task superres --factor 4 --degraded small/ --out fits/sr
    torchrun --nproc_per_node 8 launch/fit.py --model M --task embed data/shards --out fits/emb

INPUT is one shard folder (launch/make_shards.py) or image files, folders and globs. By default
the inputs are clean images that the task degrades before fitting (PSNR against the clean
image is recorded per image); with --degraded they are observations already (as
launch/restore.py takes them: for super-resolution the small images). Per-image inpainting
masks: --masks FOLDER with one FOLDER/<name>.png per input (white = hole; <name> is the row
as 10 digits for shards, the file's name without extension for files).

The output (--out, a folder or fsspec URL) holds latents.zarr (the fitted phi in the model's
row layout, keyed like keys.txt, with each image's final loss and PSNR), images/ (the restored
images as PNG files) and tb/ (TensorBoard). Results are committed in units of --batch-size
images as they are fitted: re-run the same command after a crash or a stop signal (SIGTERM,
SIGUSR1: the unit in hand is finished first) and it fits only what is left. A fitted image's
result does not depend on the number of processes or on a resume.
"""

from __future__ import annotations

import argparse
import os
import sys

from lcm_dist.lifecycle import end_with_error, share_cores

share_cores()  # before torch is imported


def _parser() -> argparse.ArgumentParser:
    from lcm_dist.restore.cli import add_fit_arguments
    from lcm_dist.restore.job import TASKS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fit_arguments(parser, task_required=True, tasks=TASKS)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="a shard folder, or images")
    parser.add_argument("--out", required=True, help="output folder or fsspec URL")
    parser.add_argument("--out-options", default="{}", help="fsspec options for --out, JSON")
    parser.add_argument(
        "--degraded",
        action="store_true",
        help="the inputs are observations already (default: clean images the task degrades)",
    )
    parser.add_argument(
        "--masks", metavar="FOLDER", help="inpainting: one mask per input, FOLDER/<name>.png"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of random masks (per row: seed + row)"
    )
    parser.add_argument(
        "--images",
        dest="image_output",
        choices=("png", "shards"),
        default="png",
        help="restored images as PNG files, or as a shard set in images/ (one shard per "
        "--batch-size images, its manifest written when all are done) (%(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.task == "embed" and args.degraded:
        parser.error("--task embed fits clean images; --degraded is for the restoration tasks")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        if world > 1:
            _join_group()
        _fit(args, rank, world)
    except (ValueError, OSError) as err:
        return end_with_error(_reason(err))
    except RuntimeError as err:
        lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
        if not any(text in str(err) for text in lost):
            raise
        return end_with_error("another process of the fit stopped", cause=False)
    return 0


def _reason(err: Exception) -> str:
    from lcm_dist.latents.retry import plain_reason

    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return f"cannot write the fit's output{where}: {plain_reason(err)}"
    return str(err)


def _join_group() -> None:
    """The processes meet once at the start (process 0 creates the output) and once at the
    end (process 0 reports); gloo serves both, on CPUs and GPUs alike."""
    import torch.distributed as dist

    dist.init_process_group("gloo")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _fit(args, rank: int, world: int) -> dict | None:
    import numpy as np
    import torch

    from lcm_dist.config import parse_options
    from lcm_dist.lifecycle import StopSignals, watch_launchers
    from lcm_dist.restore.cli import settle_fit_arguments
    from lcm_dist.restore.inputs import open_inputs
    from lcm_dist.restore.job import FitSettings, check_names, run_fit, units
    from lcm_dist.restore.model import load_model
    from lcm_dist.restore.output import FORMAT, VERSION, FitOutput

    if world > 1 and args.device == "cuda" and torch.cuda.is_available():
        from lcm_dist.distributed import device

        args.device = str(device())  # this process's own GPU
    settle_fit_arguments(args, restoring=True)
    if args.refine:
        raise ValueError(
            "--refine fine-tunes a generator per image, which a latent store cannot hold; use "
            "launch/restore.py"
        )
    if args.masks and args.task != "inpaint":
        raise ValueError("--masks is for --task inpaint")
    if args.masks and (args.mask or args.box or args.random_boxes or args.random_pixels):
        raise ValueError("choose one of --masks, --mask, --box, --random-boxes and --random-pixels")
    if args.masks and not os.path.isdir(args.masks):
        raise ValueError(f"--masks {args.masks} is not a folder")
    inputs = open_inputs(args.inputs)
    check_names(inputs)
    model = load_model(
        args.model, parse_options(args.model_options, "--model-options"), args.device
    )
    settings = FitSettings(
        task=args.task,
        degraded=args.degraded,
        iterations=args.iterations,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        factor=args.factor,
        box=args.box,
        mask=os.path.abspath(args.mask) if args.mask else None,
        masks=os.path.abspath(args.masks) if args.masks else None,
        random_boxes=args.random_boxes,
        random_pixels=args.random_pixels,
        ring_weight=args.ring_weight,
        ring_width=args.ring_width,
        finish=args.finish,
        init=args.init,
        image_output=args.image_output,
    )
    model_url = args.model if "://" in args.model else os.path.abspath(args.model)
    attrs = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_url,
        "model_checkpoint": model.attrs.get("checkpoint"),
        "phi_size": int(model.attrs["phi_size"]),
        "num_images": inputs.count,
        "inputs": inputs.describe(),
        "settings": settings.as_dict(),
    }
    output = FitOutput(args.out, parse_options(args.out_options, "--out-options"))
    if rank == 0:
        output.create_or_check(attrs, inputs.keys, attrs["phi_size"], args.batch_size)
    _barrier(world)
    if rank != 0:
        output.open()
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        if "://" not in args.out:
            writer = SummaryWriter(os.path.join(args.out, "tb"))
    watch_launchers()
    signals = StopSignals()
    try:
        result = run_fit(
            model,
            inputs,
            output,
            settings,
            rank=rank,
            world=world,
            progress=not args.quiet,
            should_stop=lambda: signals.received is not None,
            writer=writer,
        )
    finally:
        signals.close()
        if writer is not None:
            writer.close()
    print(
        f"process {rank}: fitted {result['fitted_images']} image(s) in {result['seconds']:.1f}s"
        f" ({result['skipped_units']} of {result['units']} unit(s) were already committed)",
        file=sys.stderr,
        flush=True,
    )
    if result["stopped"]:
        print(f"process {rank}: stopped by {signals.received}; re-run to finish", file=sys.stderr)
        return result
    _barrier(world)
    if rank == 0:
        done = output.committed()
        n_units = len(units(inputs.count, args.batch_size))
        if len(done) == n_units:
            if args.image_output == "shards":
                output.write_image_manifest(done, inputs.keys, model.image_size, args.batch_size)
            output.group.attrs.update({"complete": True})
            print(f"fitted all {inputs.count} image(s) into {args.out}")
            if not args.degraded:  # clean inputs: how near the fits came to them
                mean = float(np.mean(output.group["psnr"][:]))
                print(f"mean PSNR of the fitted images against their inputs: {mean:.2f} dB")
        else:
            print(f"{n_units - len(done)} of {n_units} unit(s) are not committed; re-run")
    return result


if __name__ == "__main__":
    sys.exit(main())
