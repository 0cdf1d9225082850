"""Pictures: sample grids and 2D scatter plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .data import to_uint8


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """images: (B, C, H, W) in [-1, 1] -> one uint8 array (H', W', C) with C in {1, 3, 4}."""
    arr = to_uint8(images)  # (B, H, W, C)
    b, h, w, c = arr.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255 if c != 4 else 0, dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = arr[k]
    return grid


def save_grid(images: torch.Tensor, path, nrow: Optional[int] = None, scale: int = 1) -> Path:
    """Write a PNG grid of images in [-1, 1]; ``scale`` enlarges small images (nearest)."""
    grid = make_grid(images, nrow)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[grid.shape[-1]]
    img = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_scatter(points: torch.Tensor, path, reference: Optional[torch.Tensor] = None,
                 title: str = "samples") -> Path:
    """Scatter plot of 2D points (N, 2), optionally over reference data in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ref = reference.cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
    p = points.cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", label=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
