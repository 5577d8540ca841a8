"""One evaluation as ``launch/evaluate.py`` runs it: load the model, degrade the clean images,
restore them with the LCM and the baselines, score every method and write the report."""

from __future__ import annotations


def evaluate(args, baselines: list[str], dip_counts: list[int]) -> dict:
    """Degrade, restore with each method, score and write the report into ``args.out``
    (``args``: the options of ``launch/evaluate.py``)."""
    import torch

    from lcm_dist.config import parse_options
    from lcm_dist.evaluate.baselines import dip_restore_at
    from lcm_dist.evaluate.report import score, write_report
    from lcm_dist.images import load_images
    from lcm_dist.restore.cli import operator_from_args, restore_from_args
    from lcm_dist.restore.degrade import DEFAULT_BOX, finish
    from lcm_dist.restore.fit import iteration_bar
    from lcm_dist.restore.model import load_model

    model = load_model(
        args.model, parse_options(args.model_options, "--model-options"), args.device
    )
    size = model.image_size
    clean, names = load_images(args.images, size)
    operator = operator_from_args(args, size, clean.shape[0], fill=args.fill)
    torch.manual_seed(args.seed)
    y = operator(clean)
    progress = not args.quiet
    results = {}
    if not args.no_lcm:
        images, _, seconds = restore_from_args(model, y, operator, args)
        results["lcm"] = {"images": images, "iterations": args.iterations, "seconds": seconds}
    if "dip" in baselines:
        bar = iteration_bar(clean.shape[0] * dip_counts[-1], "dip") if progress else None
        fits = dip_restore_at(
            y,
            operator,
            size,
            dip_counts,
            lr=args.dip_lr,
            seed=args.seed,
            progress=bar,
            device=args.device,
        )
        if bar is not None:
            bar.close()
        for n, (images, seconds) in fits.items():
            name = "dip" if len(fits) == 1 else f"dip@{n}"
            results[name] = {"images": images, "iterations": n, "seconds": seconds}
    if "naive" in baselines:
        import time

        start = time.perf_counter()
        images = operator.naive(y)
        results["naive"] = {
            "images": images,
            "iterations": 0,
            "seconds": time.perf_counter() - start,
        }
    # Every method is scored as restore.py writes its output (--finish; inpainting: observed
    # pixels put back), except that the naive super-resolution and colorization stay as
    # defined, beside a copy with the finish, so that the finish's gain is not the model's.
    as_defined = "naive" if args.task != "inpaint" else None
    if as_defined in results and args.finish != "raw":
        results[f"naive+{args.finish}"] = dict(results["naive"])
    for name, r in results.items():
        if name != as_defined:
            r["images"] = finish(operator, y, r["images"], args.finish)
        r["metrics"] = score(clean, r["images"], operator)
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "iterations",
            "optimizer",
            "lr",
            "dip_lr",
            "dip_iterations",
            "no_lcm",
            "factor",
            "box",
            "random_boxes",
            "random_pixels",
            "mask",
            "fill",
            "finish",
            "seed",
            "init",
            "refine",
            "refine_lr",
            "recipe",
            "ring_weight",
            "ring_width",
        )
    }
    settings["images"] = len(names)
    settings["dip_iterations"] = dip_counts if "dip" in baselines else None
    if args.task == "inpaint" and not (args.mask or args.random_boxes or args.random_pixels):
        settings["box"] = DEFAULT_BOX if args.box is None else args.box
    if args.task != "superres":
        settings["factor"] = None
    return write_report(
        args.out,
        task=args.task,
        names=names,
        clean=clean,
        observed_view=operator.show(y),
        results=results,
        settings=settings,
    )
