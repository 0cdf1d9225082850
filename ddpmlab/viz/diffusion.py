"""Pictures of the diffusion itself: forward-process strips, reverse trajectories and their GIFs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddpmlab.diffusion.process import q_sample
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import OPTION, OptionError
from ddpmlab.io.images import grid_image
from ddpmlab.samplers.generate import generate
from ddpmlab.viz.images import new_figure, save_figure, save_gif

DEFAULT_TS = (0, 50, 100, 200, 300, 500, 700, 999)


def forward_steps(x0: torch.Tensor, schedule: NoiseSchedule, ts: Sequence[int], seed: int = 0) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) (Ho et al. 2020, Eq. 4) for each t: (len(ts), B, ...) from x0 (B, ...).

    One noise draw eps is shared by all t, so each column shows the same image sinking into
    the same noise: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    """
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for t in ts:
        i = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        out.append(q_sample(schedule, x0, i, eps))
    return torch.stack(out)


def check_timesteps(ts: Sequence[int], T: int) -> List[int]:
    """``ts`` as ints, or an OptionError about 'timesteps' unless each lies in [0, T)."""
    bad = [t for t in ts if not 0 <= int(t) < T]
    if bad or not ts:
        raise OptionError("timesteps", f"{OPTION}: timesteps must lie in [0, {T - 1}] (the schedule has T={T}), "
                                       f"got {list(ts)}")
    return [int(t) for t in ts]


def save_forward_strip(x0: torch.Tensor, schedule: NoiseSchedule, path, ts: Sequence[int] = DEFAULT_TS,
                       seed: int = 0) -> Path:
    """Images x0 (B, C, H, W) (rows) diffused to each t (columns), titled with t and sqrt(abar_t)."""
    ts = check_timesteps(ts, schedule.num_timesteps)
    xs = forward_steps(x0, schedule, ts, seed)  # (K, B, C, H, W)
    k, b = xs.shape[:2]
    fig, axes = new_figure((1.1 * k, 1.1 * b + 0.4), dpi=100, nrows=b, ncols=k, squeeze=False)
    abar = schedule.alphas_cumprod
    for c, t in enumerate(ts):
        axes[0, c].set_title(f"t={t}\n" + r"$\sqrt{\bar\alpha_t}$" + f"={abar[t].sqrt():.2f}", fontsize=7)
        for r in range(b):
            _show(axes[r, c], xs[c, r])
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return save_figure(fig, path)


def _show(ax, img: torch.Tensor) -> None:
    """One (C, H, W) image in [-1, 1] on an axis without ticks."""
    arr = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def snapshot_steps(steps: int, frames: int) -> List[int]:
    """min(frames, steps) distinct step indices in [0, steps), the last one steps - 1, denser
    towards the end where the picture forms (steps still to go ~ u^2 for u uniform)."""
    frames = max(1, min(frames, steps))
    remaining = steps * np.linspace(1, 0, frames + 1)[1:] ** 2
    out: List[int] = []
    for i in np.round(steps - 1 - remaining).astype(int)[::-1]:  # from the end, keep them distinct
        out.append(max(0, min(int(i), out[-1] - 1 if out else steps - 1)))
    return sorted(out)


def record_trajectory(model, schedule: NoiseSchedule, shape: Sequence[int], n: int, *, sampler: str = "ddim",
                      steps: int = 50, frames: int = 25, prediction: str = "eps", clip_x0: Optional[float] = 1.0,
                      seed: int = 0, device="cpu", labels: Optional[torch.Tensor] = None,
                      **options) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Sample n points and keep up to ``frames`` snapshots of x_t and of the predicted x0 along the way.

    Returns (xs (F+1, n, ...), x0s (F+1, n, ...), step numbers (F+1,)); entry 0 is the start
    noise x_T (whose x0 prediction is shown as mid-grey), the last the final sample.
    """
    keep = set(snapshot_steps(steps, frames))
    xs, x0s, ks = [], [], []

    def grab(k, x, x0):
        if k in keep:
            xs.append(x.float().cpu())
            x0s.append(x0.float().cpu())
            ks.append(k + 1)

    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))  # generate's first batch
    generate(model, schedule, shape, n, sampler=sampler, steps=steps, prediction=prediction, clip_x0=clip_x0,
             batch_size=n, seed=seed, device=device, labels=labels, progress=False, callback=grab, **options)
    xs.insert(0, x_T)
    x0s.insert(0, torch.zeros_like(x_T))
    ks.insert(0, 0)
    return torch.stack(xs), torch.stack(x0s), ks


def _labelled(img: Image.Image, text: str) -> Image.Image:
    """img with a white band of text on top (Pillow's built-in font); colour pictures stay in colour."""
    mode = "RGB" if img.mode == "RGB" else "L"
    out = Image.new(mode, (img.width, img.height + 14), "white")
    out.paste(img.convert(mode), (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill="black")
    return out


def save_reverse_gif(xs: torch.Tensor, x0s: torch.Tensor, ks: Sequence[int], path, total_steps: int,
                     scale: int = 2, duration_ms: int = 120) -> Path:
    """A GIF: left the samples x_t, right the model's prediction of x0, frame by frame (images)."""
    frames = []
    for x, x0, k in zip(xs, x0s, ks):
        left = _labelled(grid_image(x, scale=scale), f"x_t  step {k}/{total_steps}")
        right = _labelled(grid_image(x0, scale=scale), "predicted x0")
        frame = Image.new(left.mode, (left.width + right.width + 8, left.height), "white")
        frame.paste(left, (0, 0))
        frame.paste(right, (left.width + 8, 0))
        frames.append(frame)
    return save_gif(frames, path, duration_ms=duration_ms, hold_last_ms=1500)


def save_reverse_strip(xs: torch.Tensor, x0s: torch.Tensor, ks: Sequence[int], path, total_steps: int,
                       stills: int = 8, rows: int = 2, title: Optional[str] = None) -> Path:
    """Stills along sampling: for each of ``rows`` samples one row of x_t and one of predicted x0; ``title``
    (e.g. a text run's prompt) above them."""
    idx = np.unique(np.linspace(0, len(ks) - 1, min(stills, len(ks))).round().astype(int))
    rows = min(rows, xs.shape[1])
    fig, axes = new_figure((1.1 * len(idx), 2.3 * rows + 0.3), dpi=100, nrows=2 * rows, ncols=len(idx),
                           squeeze=False)
    for c, j in enumerate(idx):
        axes[0, c].set_title(f"step {ks[j]}/{total_steps}", fontsize=7)
        for r in range(rows):
            _show(axes[2 * r, c], xs[j, r])
            _show(axes[2 * r + 1, c], x0s[j, r])
    for r in range(rows):
        axes[2 * r, 0].set_ylabel(r"$x_t$", fontsize=8)
        axes[2 * r + 1, 0].set_ylabel(r"$\hat x_0$", fontsize=8)
    if title:
        fig.suptitle(title if len(title) <= 90 else title[:87] + "...", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.08, top=0.85 if title else None)
    return save_figure(fig, path)
