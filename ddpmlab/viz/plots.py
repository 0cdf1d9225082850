"""Line plots: the noise schedules side by side, and a run's loss (and evaluation) curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from ddpmlab.diffusion.schedules import SCHEDULES, NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.viz.images import new_figure, save_figure


def plot_schedules(path, names: Sequence[str] = SCHEDULES, T: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> Path:
    """beta_t, alpha_bar_t and log-SNR(t) = log(alpha_bar / (1 - alpha_bar)) against t, one line per schedule."""
    fig, axes = new_figure((13, 3.6), dpi=100, ncols=3)
    t = np.arange(T)
    for name in names:
        s = NoiseSchedule.make(name, T, beta_start, beta_end)
        axes[0].plot(t, s.betas.numpy(), label=name)
        axes[1].plot(t, s.alphas_cumprod.numpy(), label=name)
        axes[2].plot(t, s.log_snr.numpy(), label=name)
    for ax, title in zip(axes, [r"$\beta_t$", r"$\bar\alpha_t$", r"log-SNR $= \log \bar\alpha_t / (1-\bar\alpha_t)$"]):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"noise schedules, T={T} (beta {beta_start:g}..{beta_end:g} where it applies)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def read_log_columns(path: Path) -> dict:
    """The numeric columns of a log (log.csv, eval.csv) as arrays over its rows with a step.  A torn or
    odd row costs its own values (NaN, which plots skip), never a whole column."""
    rows = [r for r in csv.DictReader(path.open()) if str(r.get("step") or "").isdigit()]
    cols = {key: np.array([_number(r.get(key)) for r in rows]) for key in (rows[0] if rows else {})}
    return {key: col for key, col in cols.items() if not np.isnan(col).all()}


def _smooth(y: np.ndarray, weight: float) -> np.ndarray:
    # exponential moving average, as TensorBoard's smoothing slider
    out, m = np.empty_like(y), y[0]
    for i, v in enumerate(y):
        m = weight * m + (1 - weight) * v if np.isfinite(v) else m
        out[i] = m
    return out


def plot_loss(run_dirs: Sequence, path, smooth: float = 0.8) -> Path:
    """Training loss (raw and smoothed) of one or more runs from log.csv; eval.csv metrics beside."""
    logs = []
    for run in run_dirs:
        log = Path(run) / "log.csv"
        if not log.is_file():
            raise DDPMError(f"'{run}' has no log.csv; give a folder written by `ddpm train`")
        cols = read_log_columns(log)
        if "loss" in cols:  # the rows whose loss was written in full
            good = ~np.isnan(cols["loss"])
            cols = {k: v[good] for k, v in cols.items()}
        if "loss" not in cols or len(cols["loss"]) == 0:
            raise DDPMError(f"{log} has no loss rows yet; train the run for at least train.log_every steps")
        ev = Path(run) / "eval.csv"
        logs.append((Path(run).name, cols, read_log_columns(ev) if ev.is_file() else {}))
    metrics = sorted({k for _, _, e in logs for k in e if k != "step"})
    fig, axes = new_figure((5.5 * (1 + len(metrics)), 3.8), dpi=100, ncols=1 + len(metrics), squeeze=False)
    ax = axes[0, 0]
    for i, (name, cols, _) in enumerate(logs):
        color = f"C{i}"
        ax.plot(cols["step"], cols["loss"], color=color, alpha=0.25, lw=0.8)
        ax.plot(cols["step"], _smooth(cols["loss"], smooth), color=color, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"training loss (EMA smoothing {smooth:g})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    for j, metric in enumerate(metrics, start=1):
        for i, (name, _, ev) in enumerate(logs):
            if metric in ev:
                axes[0, j].plot(ev["step"], ev[metric], "o-", color=f"C{i}", label=name)
        axes[0, j].set_title(f"eval: {metric}")
        axes[0, j].set_xlabel("step")
        axes[0, j].grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
