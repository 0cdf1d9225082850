"""What each ``ddpm viz`` command draws; every function returns the files it wrote.

Pictures of a run go to ``RUN_DIR/viz/`` unless ``out`` says otherwise; pictures that
need no run (schedules, the forward process of a bundled config) go to ``./viz/``.
The sampling commands take a loaded :class:`~ddpmlab.runs.Run` and a
:class:`~ddpmlab.runs.SamplingPlan` (see :func:`ddpmlab.runs.plan_request`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from ddpmlab.config import load_config
from ddpmlab.data import build_dataset
from ddpmlab.diffusion.schedules import SCHEDULES, NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import load_run_config
from ddpmlab.io.images import save_grid
from ddpmlab.runs import Run, SamplingPlan, draw_samples, grid_scale, resolve_output
from ddpmlab.viz.diffusion import (
    DEFAULT_TS,
    check_timesteps,
    record_trajectory,
    save_forward_strip,
    save_reverse_gif,
    save_reverse_strip,
)
from ddpmlab.viz.images import save_scatter
from ddpmlab.viz.plots import plot_loss, plot_schedules
from ddpmlab.viz.samples import save_samples
from ddpmlab.viz.toy import save_toy_animation, save_toy_data, save_toy_forward, save_toy_reverse, toy_trajectory


def _out_dir(run_dir, out) -> Path:
    if out:
        return Path(out)
    return Path(run_dir) / "viz" if run_dir else Path("viz")


def _config(run_dir, config: Optional[str]):
    return load_run_config(run_dir) if run_dir else load_config(config or "mnist")


def _refuse_sound(cfg, kind: str, where) -> None:
    """A one-line error for the pictures that draw images or 2-D points only (``kind``) of a sound run."""
    if cfg.data.dataset == "audio":
        raise DDPMError(f"`ddpm viz {kind}` draws images and 2-D points; {where or 'this config'} is sound "
                        "(data.dataset=audio): `ddpm sample` and `ddpm viz grid` write its WAV files and a picture "
                        "of their waveforms and spectrograms")


def _trajectory(run: Run, plan: SamplingPlan, n: int, seed: int, frames: int):
    """(xs, x0s, step numbers) of ``n`` samples along ``plan``, up to ``frames`` snapshots (latent runs: decoded)."""
    xs, x0s, ks = record_trajectory(plan.model, run.schedule, run.shape, n, sampler=plan.sampler, steps=plan.steps,
                                    frames=frames, prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0,
                                    seed=seed, device=run.device, labels=plan.labels, **plan.options)
    if run.codec is not None:  # latent diffusion: show each latent x_t and x0 prediction as the decoder's picture
        xs, x0s = (torch.stack([run.codec.decode(f.to(run.device)).cpu() for f in v]) for v in (xs, x0s))
    return xs, x0s, ks


def viz_forward(run_dir=None, config: Optional[str] = None, n: int = 4, ts: Optional[Sequence[int]] = None,
                seed: int = 0, out=None) -> List[Path]:
    """Forward strip of ``n`` training images (or, for 2D data, the data set) at the timesteps ``ts``
    (an OptionError about 'timesteps' unless each lies in [0, T))."""
    cfg = _config(run_dir, config)
    _refuse_sound(cfg, "forward", run_dir)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    T = schedule.num_timesteps
    ts = check_timesteps(ts, T) if ts else [t for t in DEFAULT_TS if t < T - 1] + [T - 1]
    ds = build_dataset(cfg)
    d = _out_dir(run_dir, out)
    if not ds.is_image:
        return [save_toy_forward(ds.x[:4000], schedule, d / "forward.png", ts, seed)]
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    x0 = torch.stack([ds[int(i)][0] for i in idx])
    return [save_forward_strip(x0, schedule, d / "forward.png", ts, seed)]


def viz_reverse(run: Run, plan: SamplingPlan, n: int = 16, seed: int = 0, frames: int = 25, out=None) -> List[Path]:
    """GIF of x_t beside the predicted x0 along sampling, and a strip of stills (image runs). A text run draws
    the plan's samples (``n`` of each prompt, in one batch as ``ddpm sample`` draws them from ``seed``), the
    prompts of the strip's rows above it and the prompt asked for in the file names."""
    _refuse_sound(run.cfg, "reverse", run.dir)
    if not run.is_image:
        raise DDPMError(f"'{run.dir}' is a 2D run: use `ddpm viz toy {run.dir}` for its reverse process")
    n = plan.n if plan.prompts else n  # the text conditioning bound to plan.model has plan.n rows
    xs, x0s, ks = _trajectory(run, plan, n, seed, frames)
    d = _out_dir(run.dir, out)
    scale = max(1, min(2, 64 // max(run.image_shape[1:])))
    stem = f"reverse_{plan.sampler}{plan.steps}{plan.prompt_tag}"
    return [save_reverse_gif(xs, x0s, ks, d / f"{stem}.gif", plan.steps, scale=scale),
            save_reverse_strip(xs, x0s, ks, d / f"{stem}.png", plan.steps, title=_prompts_title(plan.prompts))]


def _prompts_title(prompts: Optional[Sequence[str]], rows: int = 2) -> Optional[str]:
    """The prompts of the reverse strip's ``rows`` samples: '"a red circle"', or one per row where they differ."""
    shown = list(prompts or [])[:rows]
    if len(set(shown)) <= 1:
        return f'"{shown[0]}"' if shown else None
    return "; ".join(f'row {i + 1}: "{p}"' for i, p in enumerate(shown))


def viz_toy(run: Optional[Run] = None, plan: Optional[SamplingPlan] = None, config: Optional[str] = None,
            n: int = 2000, seed: int = 0, frames: int = 25, out=None) -> List[Path]:
    """2D run: data, forward diffusion, reverse process (stills) and a GIF of both; data and
    forward only when no run is given (the data of ``config``, default toy2d)."""
    cfg = run.cfg if run is not None else load_config(config or "toy2d")
    _refuse_sound(cfg, "toy", run.dir if run is not None else config)
    if cfg.data.dataset != "toy":
        raise DDPMError(f"`ddpm viz toy` is for 2D toy runs; this one is trained on {cfg.data.dataset} "
                        "(use ddpm viz forward / reverse)")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    data = build_dataset(cfg).x[:n]
    d = _out_dir(run.dir if run is not None else None, out)
    files = [save_toy_data(data, d / "toy_data.png", f"data: {cfg.data.toy}"),
             save_toy_forward(data, schedule, d / "toy_forward.png", seed=seed)]
    if run is None:
        return files
    xs, _, ks = toy_trajectory(plan.model, run.schedule, n, sampler=plan.sampler, steps=plan.steps, frames=frames,
                               prediction=run.cfg.diffusion.prediction, seed=seed, device=run.device,
                               labels=plan.labels, **plan.options)
    files.append(save_toy_reverse(xs, ks, plan.steps, d / "toy_reverse.png", reference=data))
    files.append(save_toy_animation(data, schedule, xs, ks, plan.steps, d / "toy_diffusion.gif",
                                    forward_frames=frames, seed=seed))
    return files


def viz_schedules(names: Sequence[str], T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                  out=None) -> List[Path]:
    bad = [s for s in names if s not in SCHEDULES]
    if bad:
        raise DDPMError(f"unknown schedule(s) {', '.join(bad)}; choose from {', '.join(SCHEDULES)}")
    path = Path(out) if out and Path(out).suffix else _out_dir(None, out) / "schedules.png"
    return [plot_schedules(path, names, T, beta_start, beta_end)]


def viz_loss(run_dirs: Sequence, smooth: float = 0.8, out=None) -> List[Path]:
    if not 0 <= smooth < 1:
        raise DDPMError(f"the smoothing weight must be in [0, 1), got {smooth}")
    path = Path(out) if out and Path(out).suffix else _out_dir(run_dirs[0], out) / "loss.png"
    return [plot_loss(run_dirs, path, smooth)]


def grid_from_npz(npz, out=None) -> List[Path]:
    """A grid (images) or scatter plot (2-D) of samples saved by `ddpm sample --npz`."""
    try:
        x = torch.from_numpy(np.load(npz)["samples"])
    except (OSError, KeyError, ValueError) as e:
        raise DDPMError(f"'{npz}' is not a samples file written by `ddpm sample --npz` ({e})") from None
    default = Path(npz).with_suffix(".grid.png")
    path = Path(out) if out and Path(out).suffix else (Path(out) if out else default.parent) / default.name
    if x.ndim == 4:
        return [save_grid(x, path, scale=grid_scale(x.shape[1:]))]
    return [save_scatter(x, path, title="samples")]


def viz_grid(run: Run, plan: SamplingPlan, n: int = 64, seed: int = 0, out=None, batch_size: int = 256,
             progress: bool = True) -> List[Path]:
    """A grid (images) or scatter plot (2-D) of fresh samples of a run."""
    name = f"grid_{plan.sampler}{plan.steps}_seed{seed}.png"
    output = resolve_output(out if out and Path(out).suffix else None, _out_dir(run.dir, out) / name)
    x = draw_samples(run, plan, n, seed=seed, batch_size=batch_size, progress=progress)
    return save_samples(run, x, output, title="samples", nrow=plan.per_prompt)
