"""Evaluation: degrade clean images, restore them with the LCM and with baselines, and score.

``evaluate`` writes ``report.json`` (per image and mean PSNR / SSIM per method, over the whole
image and, for inpainting, over the hole; iterations and seconds per method), ``grid.png``
(one row per image: clean, degraded, then each method, labelled, small images enlarged) and the grid to TensorBoard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lcm_dist.evaluate.metrics import psnr, ssim
from lcm_dist.images import image_grid, to_png_bytes
from lcm_dist.restore.degrade import Degradation, Inpaint

METHODS = ("lcm", "dip", "naive")


def score(clean: torch.Tensor, restored: torch.Tensor, operator: Degradation) -> list[dict]:
    """Per-image metrics; for inpainting also over the hole."""
    results = []
    holes = operator.hole(clean.shape[0]) if isinstance(operator, Inpaint) else None
    for i in range(clean.shape[0]):
        m = {"psnr": psnr(restored[i], clean[i]), "ssim": ssim(restored[i], clean[i])}
        if holes is not None:
            hole = holes[i, 0]
            m["psnr_hole"] = psnr(restored[i], clean[i], hole)
            m["ssim_hole"] = ssim(restored[i], clean[i], hole)
        results.append(m)
    return results


def mean_metrics(per_image: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


def write_report(
    out_dir: str | os.PathLike,
    *,
    task: str,
    names: list[str],
    clean: torch.Tensor,
    observed_view: torch.Tensor,
    results: dict[str, dict],
    settings: dict,
) -> dict:
    """Write report.json, grid.png and the grid to TensorBoard; ``results`` maps a method to
    {"images": tensor, "metrics": per-image list, "iterations": n, "seconds": s}."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "task": task,
        "settings": settings,
        "columns": ["clean", "degraded", *results],
        "methods": {
            m: {"iterations": r["iterations"], "seconds": round(r["seconds"], 2)}
            for m, r in results.items()
        },
        "mean": {m: mean_metrics(r["metrics"]) for m, r in results.items()},
        "images": [
            {"name": name, **{m: r["metrics"][i] for m, r in results.items()}}
            for i, name in enumerate(names)
        ],
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "report.json")
    rows = [clean, observed_view] + [r["images"] for r in results.values()]
    # One grid row per image: clean | degraded | method 1 | method 2 ...
    grid = labelled_grid(
        ["clean", "degraded", *results],
        [torch.stack([row[i] for row in rows]) for i in range(clean.shape[0])],
    )
    (out / "grid.png").write_bytes(to_png_bytes(grid))
    with SummaryWriter(str(out / "tb")) as writer:
        writer.add_image(f"evaluate/{task}", grid, 0)
        for m, values in report["mean"].items():
            for k, v in values.items():
                writer.add_scalar(f"evaluate/{task}/{m}/{k}", v, 0)
    return report


GRID_CELL = 128
"""Smallest side, in pixels, of an image in grid.png (small images are enlarged, nearest)."""


def labelled_grid(columns: list[str], rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """``image_grid`` of ``rows`` (each (len(columns), C, H, W)) with every image enlarged to at
    least GRID_CELL pixels and the column names written above; returns (3, H, W) in [0, 1]."""
    from PIL import Image, ImageDraw

    side = rows[0].shape[-1]
    scale = max(1, -(-GRID_CELL // side))
    rows = [torch.nn.functional.interpolate(r.float(), scale_factor=scale) for r in rows]
    grid = image_grid(rows, pad)
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    header = 16
    canvas = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + header), "white")
    canvas.paste(Image.fromarray(pixels), (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(columns):
        draw.text((pad + i * (side * scale + pad) + 2, 2), name, fill="black")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0


def format_table(report: dict) -> str:
    """The mean metrics as a small text table."""
    keys = list(next(iter(report["mean"].values())))
    lines = ["method  " + "  ".join(f"{k:>10}" for k in keys) + "  iterations   seconds"]
    for m, values in report["mean"].items():
        info = report["methods"][m]
        lines.append(
            f"{m:<7} "
            + "  ".join(f"{values[k]:>10.4f}" for k in keys)
            + f"  {info['iterations']:>10}  {info['seconds']:>8.1f}"
        )
    return "\n".join(lines)
