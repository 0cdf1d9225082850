"""Pixels out: sample grids, 2D scatter plots, GIF animations, matplotlib figures as arrays.

Figures use matplotlib's object-oriented API (:func:`new_figure`): each one draws on its own
Agg canvas, so neither pyplot's figure list nor the process's backend (a notebook's, say)
is touched.  matplotlib is imported when the first figure is made (it takes a quarter of a
second), so importing the package does not pay for it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(figsize: tuple[float, float], dpi: float = 100, nrows: int = 1, ncols: int = 1,
               **subplots_kw) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas and its axes (``Figure.subplots(nrows, ncols, **subplots_kw)``).

    Needs no display, no pyplot and no backend switch; the figure is freed with its last reference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplots_kw)


def save_scatter(points: torch.Tensor, path, reference: Optional[torch.Tensor] = None,
                 title: str = "samples") -> Path:
    """Scatter plot of 2D points (N, 2), optionally over reference data in grey.

    With a reference the frame is the data's extent plus half of it on each side, so a few far
    outliers cannot shrink the picture to a dot; how many samples fall outside is in the legend.
    """
    fig, ax = new_figure((5, 5), dpi=100)
    p = points.detach().cpu().double().numpy()
    label = title
    if reference is not None:
        ref = reference.detach().cpu().double().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
        lo, hi = ref.min(0), ref.max(0)
        lo, hi = lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)
        outside = int((~((p >= lo) & (p <= hi)).all(1)).sum())
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        label += f" ({outside} outside the frame)" if outside else ""
    ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", label=label)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def figure_array(fig: Figure) -> np.ndarray:
    """The pixels of a matplotlib figure with an Agg canvas (:func:`new_figure`), drawn now: uint8 (H, W, 3)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path) -> Path:
    """Save a figure; PNGs get an adaptive 256-colour palette (a third of the bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".png":
        fig.savefig(path, bbox_inches="tight")
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path


def save_gif(frames: Sequence, path, duration_ms: int = 100, hold_last_ms: int = 1000) -> Path:
    """An endlessly looping GIF (Pillow's writer) of uint8 frames (H, W) or (H, W, 3), or PIL images."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    images = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in frames]
    if images[0].mode == "L":  # 32 grey levels: invisible on noise, and LZW packs it far better
        images = [im.point(lambda v: v if v in (0, 255) else (v // 8) * 8 + 4) for im in images]
    else:  # one palette per frame from 64 colours keeps the file small
        images = [im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT) for im in images]
    durations = [duration_ms] * (len(images) - 1) + [max(duration_ms, hold_last_ms)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)
    return path
