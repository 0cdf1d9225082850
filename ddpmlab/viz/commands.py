"""What each ``ddpm viz`` command draws; every function returns the files it wrote.

Pictures of a run go to ``RUN_DIR/viz/`` unless ``out`` says otherwise; pictures that
need no run (schedules, the forward process of a bundled config) go to ``./viz/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ddpmlab.config import load_config
from ddpmlab.data import build_dataset, data_shape
from ddpmlab.diffusion.reverse import ddpm_sampler_variance
from ddpmlab.diffusion.schedules import SCHEDULES, NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import list_checkpoints, load_model, load_run_config, require_run_dir
from ddpmlab.io.images import save_grid
from ddpmlab.samplers.generate import generate
from ddpmlab.viz.diffusion import (
    DEFAULT_TS,
    record_trajectory,
    save_forward_strip,
    save_reverse_gif,
    save_reverse_strip,
)
from ddpmlab.viz.images import save_scatter
from ddpmlab.viz.plots import plot_loss, plot_schedules
from ddpmlab.viz.toy import save_toy_animation, save_toy_data, save_toy_forward, save_toy_reverse, toy_trajectory


def _out_dir(run_dir, out) -> Path:
    if out:
        return Path(out)
    return Path(run_dir) / "viz" if run_dir else Path("viz")


def _config(run_dir, config: Optional[str]):
    return load_run_config(run_dir) if run_dir else load_config(config or "mnist")


def _load(run_dir, weights: str, device):
    run_dir = require_run_dir(run_dir)
    ckpts = list_checkpoints(run_dir)
    if ckpts and not (ckpts[0] / f"{weights}.safetensors").is_file():
        raise DDPMError(f"run '{run_dir}': checkpoint {ckpts[0].name} has no {weights} weights; use --weights "
                        f"{'model' if weights == 'ema' else 'ema'}")
    return load_model(run_dir, weights, device)


def _steps(sampler: str, steps: Optional[int], T: int) -> int:
    steps = steps if steps is not None else (T if sampler == "ddpm" else 50)
    if not 1 <= steps <= T:
        raise DDPMError(f"--steps must be between 1 and {T} (the model's num_timesteps), got {steps}")
    return steps


def _options(cfg, sampler: str, options: dict) -> dict:
    """DDPM sampling uses the run's own variance unless --variance says otherwise."""
    options = {k: v for k, v in options.items() if v is not None}
    if sampler == "ddpm" and "variance" not in options and getattr(cfg.diffusion, "variance", None):
        try:
            options["variance"] = ddpm_sampler_variance(cfg.diffusion.variance)
        except (ImportError, KeyError):
            pass
    if sampler != "ddim":
        options.pop("eta", None)
    if sampler != "ddpm":
        options.pop("variance", None)
    return options


def _labels(cfg, n: int):
    k = int(cfg.model.num_classes or 0)
    return torch.arange(n) % k if k else None


def viz_forward(run_dir=None, config: Optional[str] = None, n: int = 4, ts: Optional[Sequence[int]] = None,
                seed: int = 0, out=None) -> List[Path]:
    """Forward strip of ``n`` training images (or, for 2D data, the data set) at several t."""
    cfg = _config(run_dir, config)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    T = schedule.num_timesteps
    ts = list(ts) if ts else [t for t in DEFAULT_TS if t < T - 1] + [T - 1]
    ds = build_dataset(cfg)
    d = _out_dir(run_dir, out)
    if not ds.is_image:
        return [save_toy_forward(ds.x[:4000], schedule, d / "forward.png", ts, seed)]
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    x0 = torch.stack([ds[int(i)][0] for i in idx])
    return [save_forward_strip(x0, schedule, d / "forward.png", ts, seed)]


def viz_reverse(run_dir, sampler: str = "ddim", steps: Optional[int] = None, n: int = 16, seed: int = 0,
                frames: int = 25, weights: str = "ema", device="cpu", out=None, **options) -> List[Path]:
    """GIF of x_t beside the predicted x0 along sampling, and a strip of stills (image runs)."""
    cfg, model = _load(run_dir, weights, device)
    shape = data_shape(cfg)
    if len(shape) != 3:
        raise DDPMError(f"'{run_dir}' is a 2D run: use `ddpm viz toy {run_dir}` for its reverse process")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    steps = _steps(sampler, steps, schedule.num_timesteps)
    xs, x0s, ks = record_trajectory(model, schedule, shape, n, sampler=sampler, steps=steps, frames=frames,
                                    prediction=cfg.diffusion.prediction, seed=seed, device=device,
                                    labels=_labels(cfg, n), **_options(cfg, sampler, options))
    d = _out_dir(run_dir, out)
    scale = max(1, min(2, 64 // max(shape[1:])))
    return [save_reverse_gif(xs, x0s, ks, d / f"reverse_{sampler}{steps}.gif", steps, scale=scale),
            save_reverse_strip(xs, x0s, ks, d / f"reverse_{sampler}{steps}.png", steps)]


def viz_toy(run_dir=None, config: Optional[str] = None, sampler: str = "ddpm", steps: Optional[int] = None,
            n: int = 2000, seed: int = 0, frames: int = 25, weights: str = "ema", device="cpu", out=None,
            **options) -> List[Path]:
    """2D run: data, forward diffusion, reverse process (stills) and a GIF of both; data and
    forward only when no run is given."""
    cfg = _config(run_dir, config or "toy2d")
    if cfg.data.dataset != "toy":
        raise DDPMError(f"`ddpm viz toy` is for 2D toy runs; this one is trained on {cfg.data.dataset} "
                        "(use ddpm viz forward / reverse)")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    data = build_dataset(cfg).x[:n]
    d = _out_dir(run_dir, out)
    files = [save_toy_data(data, d / "toy_data.png", f"data: {cfg.data.toy}"),
             save_toy_forward(data, schedule, d / "toy_forward.png", seed=seed)]
    if not run_dir:
        return files
    cfg, model = _load(run_dir, weights, device)
    steps = _steps(sampler, steps, schedule.num_timesteps)
    xs, _, ks = toy_trajectory(model, schedule, n, sampler=sampler, steps=steps, frames=frames,
                               prediction=cfg.diffusion.prediction, seed=seed, device=device,
                               labels=_labels(cfg, n), **_options(cfg, sampler, options))
    files.append(save_toy_reverse(xs, ks, steps, d / "toy_reverse.png", reference=data))
    files.append(save_toy_animation(data, schedule, xs, ks, steps, d / "toy_diffusion.gif", forward_frames=frames,
                                    seed=seed))
    return files


def viz_schedules(names: Sequence[str], T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                  out=None) -> List[Path]:
    bad = [s for s in names if s not in SCHEDULES]
    if bad:
        raise DDPMError(f"--schedules: unknown schedule(s) {', '.join(bad)}; choose from {', '.join(SCHEDULES)}")
    path = Path(out) if out and Path(out).suffix else _out_dir(None, out) / "schedules.png"
    return [plot_schedules(path, names, T, beta_start, beta_end)]


def viz_loss(run_dirs: Sequence, smooth: float = 0.8, out=None) -> List[Path]:
    if not 0 <= smooth < 1:
        raise DDPMError(f"--smooth must be in [0, 1), got {smooth}")
    path = Path(out) if out and Path(out).suffix else _out_dir(run_dirs[0], out) / "loss.png"
    return [plot_loss(run_dirs, path, smooth)]


def viz_grid(run_dir=None, npz: Optional[str] = None, sampler: str = "ddim", steps: Optional[int] = None,
             n: int = 64, seed: int = 0, weights: str = "ema", device="cpu", out=None, **options) -> List[Path]:
    """A grid (images) or scatter (2D) of fresh samples of a run, or of samples saved by `ddpm sample --npz`."""
    import numpy as np


    if npz:
        try:
            x = torch.from_numpy(np.load(npz)["samples"])
        except (OSError, KeyError, ValueError) as e:
            raise DDPMError(f"--npz '{npz}' is not a samples file written by `ddpm sample --npz` ({e})") from None
        name, folder = Path(npz).with_suffix(".grid.png").name, Path(npz).parent
    else:
        if not run_dir:
            raise DDPMError("ddpm viz grid needs RUN_DIR (to sample) or --npz FILE (saved samples)")
        cfg, model = _load(run_dir, weights, device)
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        steps = _steps(sampler, steps, schedule.num_timesteps)
        shape = data_shape(cfg)
        x = generate(model, schedule, shape, n, sampler=sampler, steps=steps, prediction=cfg.diffusion.prediction,
                     clip_x0=1.0 if len(shape) == 3 else None, seed=seed, device=device,
                     labels=_labels(cfg, n), **_options(cfg, sampler, options))
        name, folder = f"grid_{sampler}{steps}_seed{seed}.png", _out_dir(run_dir, None)
    path = Path(out) if out and Path(out).suffix else (Path(out) if out else folder) / name
    if x.ndim == 4:
        return [save_grid(x, path, scale=max(1, min(4, 128 // max(x.shape[2:]))))]
    return [save_scatter(x, path, title="samples")]
