"""Scatter-panel figures of 2-D data under the forward and the reverse process.

``forward_points`` collects q(x_t) of data points, ``reverse_points`` the states of an
ancestral sampler at matching timesteps; ``save_panels`` draws rows of scatter panels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ddpmlab.diffusion.process import q_sample
from ddpmlab.diffusion.schedules import NoiseSchedule, select_timesteps
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.viz.images import new_figure


def forward_points(schedule: NoiseSchedule, x0: torch.Tensor, ts: Sequence[int],
                   generator: Optional[torch.Generator] = None) -> list:
    """[(f"t = {t}", x_t (N, 2))] for x_t ~ q(x_t | x_0) (Ho et al. 2020, Eq. 4) at each t."""
    out = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=generator)
        label = "data" if t < 0 else f"t = {t + 1}"
        out.append((label, x0 if t < 0 else q_sample(schedule, x0, torch.full((len(x0),), t), noise).float()))
    return out


@torch.no_grad()
def reverse_points(model, schedule: NoiseSchedule, n: int, steps: int, variance: str,
                   show: Sequence[int] = (500, 250, 100, 50, 0), prediction: str = "eps", seed: int = 0) -> list:
    """[(label, x (n, 2))] along one ancestral (DDPM) run of ``steps`` respaced steps: x_T, then
    the state after the step that lands nearest to each paper timestep in ``show`` (0: the samples)."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x_T = torch.randn(n, 2, generator=g).to(device)
    ts = select_timesteps(schedule.num_timesteps, steps)
    # after step k the state is at paper timestep ts[steps - 2 - k] + 1 (0 after the last step)
    landed = [int(ts[steps - 2 - k]) + 1 if k < steps - 1 else 0 for k in range(steps)]
    keep = {min(range(steps), key=lambda k: abs(landed[k] - t)) for t in show}
    states = [(f"x_T (t = {schedule.num_timesteps})", x_T.cpu())]

    def cb(k, x, x0):
        if k in keep:
            states.append((f"t = {landed[k]}" if landed[k] else "x_0 (samples)", x.float().cpu()))

    SAMPLERS["ddpm"](ModelPredictor(model, schedule, prediction), schedule, x_T, steps, generator=g, callback=cb,
                     variance=variance)
    return states


def save_panels(rows: Sequence[tuple], path, reference: Optional[torch.Tensor] = None, lim: float = 3.0) -> Path:
    """rows: [(row title, [(panel label, points (N, 2)), ...]), ...] -> one PNG of scatter panels."""
    ncol = max(len(panels) for _, panels in rows)
    fig, axes = new_figure((2.2 * ncol, 2.4 * len(rows)), dpi=100, nrows=len(rows), ncols=ncol, squeeze=False)
    for r, (title, panels) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            label, pts = panels[c]
            if reference is not None:
                ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.85")
            p = pts.cpu().numpy()
            ax.scatter(p[:, 0], p[:, 1], s=1, c="tab:blue")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_title(label, fontsize=8)
        axes[r][0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
