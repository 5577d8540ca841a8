"""Images as tensors: loading image files, PNG encoding and image grids."""

from __future__ import annotations

import io
import os

import numpy as np
import torch


def load_images(paths: list[str], size: int) -> tuple[torch.Tensor, list[str]]:
    """Image files (or folders of them) as a (N, 3, size, size) batch in [0, 1], each
    centre-cropped to a square and resized; returns (images, names)."""
    from lcm_dist.files import collect_sources, load_image, prepare_image

    files = collect_sources(paths)
    images = [
        torch.from_numpy(np.array(prepare_image(load_image(f), size))).permute(2, 0, 1)
        for f in files
    ]
    return torch.stack(images).float() / 255.0, [os.path.basename(f) for f in files]


def to_png_bytes(image: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] as PNG bytes."""
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack equally sized (B, C, H, W) batches as grid rows: returns (C, H_total, W_total)."""
    b, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, b * (w + pad) + pad)
    for r, batch in enumerate(rows):
        for i in range(b):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[:, top : top + h, left : left + w] = batch[i].detach().float().clamp(0, 1).cpu()
    return grid
