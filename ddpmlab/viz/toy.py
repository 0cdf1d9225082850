"""2D toy pictures: the data, its forward diffusion and the learned reverse process (stills, GIF)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.viz.diffusion import forward_steps, record_trajectory
from ddpmlab.viz.images import figure_array, new_figure, save_figure, save_gif

LIM = 3.0  # toy sets are standardised: +-3 holds the data and the N(0, I) end of the diffusion


def _scatter(ax, points: torch.Tensor, title: str, color: str = "tab:blue",
             reference: Optional[torch.Tensor] = None) -> None:
    if reference is not None:
        r = reference.cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=1, c="0.8", rasterized=True)
    p = points.cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=1, c=color, rasterized=True)
    ax.set_xlim(-LIM, LIM)
    ax.set_ylim(-LIM, LIM)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def _panels(sets: Sequence[torch.Tensor], titles: Sequence[str], path, color: str,
            reference: Optional[torch.Tensor] = None) -> Path:
    fig, axes = new_figure((1.9 * len(sets), 2.1), dpi=100, ncols=len(sets), squeeze=False)
    for ax, pts, title in zip(axes[0], sets, titles):
        _scatter(ax, pts, title, color, reference)
    fig.subplots_adjust(wspace=0.05)
    return save_figure(fig, path)


def save_toy_data(data: torch.Tensor, path, title: str = "data") -> Path:
    """Scatter of the 2D data set (N, 2)."""
    return _panels([data], [title], path, "tab:gray")


def save_toy_forward(data: torch.Tensor, schedule: NoiseSchedule, path,
                     ts: Sequence[int] = (0, 10, 25, 50, 100, 200, 500, 999), seed: int = 0) -> Path:
    """q(x_t | x_0) of the whole data set at several t: the roll dissolves into N(0, I)."""
    xs = forward_steps(data, schedule, ts, seed)
    return _panels(list(xs), [f"q(x_t), t={t}" for t in ts], path, "tab:orange")


def save_toy_reverse(xs: torch.Tensor, ks: Sequence[int], total_steps: int, path, stills: int = 8,
                     reference: Optional[torch.Tensor] = None) -> Path:
    """Samples along the reverse process (from :func:`~ddpmlab.viz.diffusion.record_trajectory`)."""
    idx = np.unique(np.linspace(0, len(ks) - 1, min(stills, len(ks))).round().astype(int))
    return _panels([xs[j] for j in idx], [f"step {ks[j]}/{total_steps}" for j in idx], path, "tab:blue",
                   reference)


def save_toy_animation(data: torch.Tensor, schedule: NoiseSchedule, xs: torch.Tensor, ks: Sequence[int],
                       total_steps: int, path, forward_frames: int = 15, seed: int = 0,
                       duration_ms: int = 150) -> Path:
    """GIF: the forward diffusion of the data (orange), then the reverse process from noise (blue): at most
    T forward frames (distinct timesteps), however many ``forward_frames`` asks for."""
    T = schedule.num_timesteps
    if forward_frames >= T:  # every timestep (without an array of forward_frames entries)
        ts = np.arange(T)
    else:
        ts = np.unique(np.geomspace(1, T, max(1, forward_frames)).round().astype(int) - 1)
    frames: List[np.ndarray] = []
    fig, ax = new_figure((3, 3), dpi=70)
    for t, pts in zip(ts, forward_steps(data, schedule, ts.tolist(), seed)):
        ax.clear()
        _scatter(ax, pts, f"forward q(x_t | x_0), t={t}", "tab:orange")
        frames.append(figure_array(fig))
    for x, k in zip(xs, ks):
        ax.clear()
        _scatter(ax, x, f"reverse, step {k}/{total_steps}", "tab:blue")
        frames.append(figure_array(fig))
    return save_gif(frames, path, duration_ms=duration_ms, hold_last_ms=1500)


def toy_trajectory(model, schedule: NoiseSchedule, n: int, **kwargs) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """:func:`~ddpmlab.viz.diffusion.record_trajectory` for 2D points (no clipping of x0)."""
    return record_trajectory(model, schedule, (2,), n, clip_x0=None, **kwargs)
