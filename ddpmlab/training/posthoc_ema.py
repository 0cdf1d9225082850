"""Power-function EMA, and any EMA length chosen after training (Karras et al. 2024, Sec. 3, App. C).

A power-function EMA weighs the weights theta_1 .. theta_t of a run in proportion to tau^gamma:

    ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,    beta_t = (1 - 1/t)^(gamma + 1),

so that (telescoping the product of the betas) theta_tau enters ema_t with the weight
(1 - (1 - 1/tau)^(gamma+1)) (tau/t)^(gamma+1), about (gamma+1) tau^gamma / t^(gamma+1): a profile
whose width relative to t, sigma_rel, does not change as training goes on,

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

Training keeps such EMAs for a few sigma_rel (``train.ema_profiles``) and writes snapshots of
them every ``train.ema_snapshot_every`` steps to RUN/ema/.  The profile of a snapshot taken at
t_i with exponent g_i is p_i(tau) = (g_i + 1) tau^g_i / t_i^(g_i + 1) on (0, t_i]; any other
profile p (another sigma_rel, an earlier t) is approximated by the combination sum_i x_i p_i
that is closest to it in L2, so the same combination of the snapshots' weights is the
reconstructed EMA: the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p> have
the closed form of :func:`profile_inner`.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.errors import ConfigError, DDPMError

EMA_DIR = "ema"
SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma = 0, a uniform average over the whole run
_SNAPSHOT = re.compile(r"step_(\d+)_sigma([0-9.]+)\.safetensors")


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the profile with relative width ``sigma_rel`` in (0, 1/sqrt(12))."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel} (EDM2 uses 0.05-0.15)")
    s2 = sigma_rel**2  # (g + 1) = s2 (g + 2)^2 (g + 3), a cubic in g
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def sigma_rel_of_gamma(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(step: int, gamma: float) -> float:
    """beta_t of the power-function EMA at step t >= 1 (0 at t = 1: the EMA starts as the weights)."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


class PowerEMA:
    """Power-function EMAs of a model for several sigma_rel, updated after each optimizer step."""

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.copies = [copy.deepcopy(model).requires_grad_(False) for _ in self.sigma_rels]

    def to(self, device) -> "PowerEMA":
        for c in self.copies:
            c.to(device)
        return self

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """ema <- beta_t ema + (1 - beta_t) theta for every profile, t = ``step`` (1-based)."""
        for g, ema in zip(self.gammas, self.copies):
            beta = power_beta(step, g)
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p.detach().to(e.dtype), 1.0 - beta)
            for e, b in zip(ema.buffers(), model.buffers()):
                e.copy_(b)

    def names(self) -> List[str]:
        return [f"ema_sigma{s:.3f}" for s in self.sigma_rels]

    def state_dicts(self) -> Dict[str, dict]:
        return {name: c.state_dict() for name, c in zip(self.names(), self.copies)}

    def load_state_dicts(self, states: Dict[str, dict]) -> None:
        for name, c in zip(self.names(), self.copies):
            if name not in states:
                raise DDPMError(f"the checkpoint has no {name} weights: train.ema_profiles cannot change on resume")
            c.load_state_dict(states[name])


def profile_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """<p_a, p_b> = integral over (0, min(t_a, t_b)] of the two normalised power profiles."""
    m = min(t_a, t_b)
    log = (math.log((g_a + 1) * (g_b + 1) / (g_a + g_b + 1)) + (g_a + g_b + 1) * math.log(m)
           - (g_a + 1) * math.log(t_a) - (g_b + 1) * math.log(t_b))
    return math.exp(log)


def posthoc_weights(snapshots: Sequence[Tuple[int, float]], step: int, gamma: float) -> torch.Tensor:
    """x (n,) float64: the combination of snapshot profiles (step_i, gamma_i) closest to the profile
    (``step``, ``gamma``), from the normal equations (least squares where A is ill-conditioned)."""
    a = torch.tensor([[profile_inner(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots],
                     dtype=torch.float64)
    b = torch.tensor([profile_inner(ti, gi, step, gamma) for ti, gi in snapshots], dtype=torch.float64)
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


def snapshot_path(run_dir, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / EMA_DIR / f"step_{step:07d}_sigma{sigma_rel:.3f}.safetensors"


def save_snapshot(run_dir, step: int, sigma_rel: float, state: dict) -> Path:
    """Write one profile's weights at ``step`` atomically (a temporary file renamed into place)."""
    return atomic_save_tensors(state, snapshot_path(run_dir, step, sigma_rel))


def list_snapshots(run_dir) -> List[Tuple[int, float, Path]]:
    """(step, sigma_rel, path) of every snapshot in RUN/ema, oldest first."""
    folder = Path(run_dir) / EMA_DIR
    found = [(int(m.group(1)), float(m.group(2)), p) for p in sorted(folder.glob("step_*.safetensors"))
             if (m := _SNAPSHOT.fullmatch(p.name))]
    return sorted(found)


def reconstruct(run_dir, sigma_rel: float, step: int = 0) -> Tuple[dict, int, torch.Tensor]:
    """(weights, step, coefficients) of the power EMA with ``sigma_rel`` at ``step`` (0: the last
    snapshot step), combined from the snapshots taken up to that step."""
    gamma = gamma_of_sigma_rel(sigma_rel)
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise DDPMError(f"run '{run_dir}' has no EMA snapshots in {EMA_DIR}/: train it with "
                        "train.ema_profiles=[0.05,0.1] (and train.ema_snapshot_every) to choose the EMA afterwards")
    step = step or snaps[-1][0]
    snaps = [s for s in snaps if s[0] <= step]
    if not snaps:
        raise DDPMError(f"run '{run_dir}' has no EMA snapshot at or before step {step}")
    x = posthoc_weights([(t, gamma_of_sigma_rel(s)) for t, s, _ in snaps], step, gamma)
    total, dtypes = {}, {}
    for coef, (_, _, path) in zip(x.tolist(), snaps):
        for k, v in load_file(str(path)).items():
            dtypes[k] = v.dtype
            total[k] = total.get(k, 0.0) + coef * v.double()
    return {k: v.to(dtypes[k]) for k, v in total.items()}, step, x
