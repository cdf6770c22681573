"""Sample grids as PNG, with Pillow and numpy only (torchvision does not import beside CPU torch)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """N x C x H x W in [-1, 1] -> one uint8 H' x W' (x 3) image, `nrow` per row, `pad` px apart."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.zeros((c, pad + rows * (h + pad), pad + nrow * (w + pad)), dtype=np.uint8)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y : y + h, x : x + w] = pixels[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Write the grid atomically (temp file + rename): a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid_array(images, nrow)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
