"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021) and DiffWave's fast
sampling (Kong et al. 2021, App. B: ancestral steps between the noise levels of any step schedule).

All are pure functions: ``sample(predict, schedule, x_T, steps, *, generator, callback)``
where ``predict(x_t, t) -> (eps, x0)`` (see :class:`~ddpmlab.samplers.base.ModelPredictor`)
and ``schedule`` is the full training schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ddpmlab.diffusion.reverse import ancestral_step, check_variance
from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t, select_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import Callback, randn_like
from ddpmlab.samplers.steps import Timesteps, resolve_timesteps


def respaced(schedule: NoiseSchedule, steps: Optional[int], spacing: str = "uniform") -> NoiseSchedule:
    """``schedule`` on ``steps`` of its timesteps (Nichol & Dhariwal 2021, Sec. 4); itself for None or T."""
    T = schedule.num_timesteps
    return schedule if steps is None or steps == T else schedule.respace(select_timesteps(T, steps, spacing))


def predict_step(predict, schedule: NoiseSchedule, x: torch.Tensor, i: int, variance: str):
    """(eps, x0, log sigma^2 or None) of the model at entry ``i`` of the (respaced) ``schedule``."""
    t = schedule.timesteps[i].to(x.device)
    if variance != "learned_range":
        return (*predict(x, t), None)
    if not hasattr(predict, "with_log_variance"):
        raise ConfigError("DDPM variance 'learned_range' needs a ModelPredictor around a model with a variance head")
    idx = torch.full((x.shape[0],), i, dtype=torch.long)
    return predict.with_log_variance(x, t, schedule=schedule, index=idx)


@torch.no_grad()
def ddpm(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: Optional[int] = None, *,
         generator: Optional[torch.Generator] = None, callback: Callback = None,
         variance: str = "fixed_large", spacing: str = "uniform") -> torch.Tensor:
    """Ancestral sampling of p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), x_T: (B, ...) -> x_0.

    variance: "fixed_large" (sigma_t^2 = beta_t) or "fixed_small" (sigma_t^2 = beta_tilde_t),
    the two fixed choices of Ho et al. 2020, Sec. 3.2, or "learned_range" (the model's
    variance head, Nichol & Dhariwal 2021, Eq. 15; ``predict.with_log_variance``).  With steps < T
    the schedule is respaced and all variances are those of the respaced process.
    """
    variance = check_variance(variance)
    spaced = respaced(schedule, steps, spacing)
    x = x_T
    for k, i in enumerate(range(spaced.num_timesteps - 1, -1, -1)):
        eps, x0, log_var = predict_step(predict, spaced, x, i, variance)
        noise = randn_like(x, generator) if i > 0 else None
        x = ancestral_step(spaced, x, i, x0, variance, log_var, noise)  # Ho et al. 2020, Alg. 2, line 4
        if callback is not None:
            callback(k, x, x0)
    return x


@torch.no_grad()
def ddim(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, *,
         generator: Optional[torch.Generator] = None, callback: Callback = None,
         eta: float = 0.0, spacing: str = "uniform") -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) on ``steps`` timesteps; eta=0 is deterministic, eta=1 DDPM-like."""
    if eta < 0:
        raise ConfigError(f"DDIM eta must be >= 0, got {eta}")
    T = schedule.num_timesteps
    ts = select_timesteps(T, steps, spacing)
    abar = schedule.alphas_cumprod
    x = x_T
    for k in range(len(ts) - 1, -1, -1):
        t = ts[k]
        a_t = float(abar[t])
        a_prev = float(abar[ts[k - 1]]) if k > 0 else 1.0
        eps, x0 = predict(x, t.to(x.device))
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # Song et al. 2021, Eq. 12: predicted x0, direction pointing to x_t, random noise
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(len(ts) - 1 - k, x, x0)
    return x


@torch.no_grad()
def diffwave_fast(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 6, *,
                  generator: Optional[torch.Generator] = None, callback: Callback = None,
                  timesteps: Timesteps = "diffwave", variance: str = "fixed_small") -> torch.Tensor:
    """DiffWave's fast sampling (Kong et al. 2021, App. B): ``steps`` ancestral steps between the noise levels
    of a step schedule, by default the paper's six (steps.diffwave_timesteps); NFE = steps.

    With gamma_s the alpha_bar of level s (1 after the last) and beta_s = 1 - gamma_s / gamma_{s-1}, each step
    is Ho et al. 2020's Algorithm 2 on that respaced process: x_{s-1} = mu_tilde(x_s, x0) (their Eq. 7) +
    sigma_s z, sigma_s^2 = (1 - gamma_{s-1}) / (1 - gamma_s) beta_s (fixed_small, the paper's) or beta_s
    (fixed_large); the model sees the level's fractional training time (the paper's t_align).
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ConfigError(f"diffwave_fast takes variance fixed_small (the paper's) or fixed_large, got {variance!r}")
    ts = resolve_timesteps(timesteps, schedule, steps)
    abar = abar_of_t(schedule, ts).tolist() + [1.0]
    x = x_T
    for k, t in enumerate(ts):
        a_t, a_prev = abar[k], abar[k + 1]
        beta = 1.0 - a_t / a_prev
        eps, x0 = predict(x, t.to(x.device))
        # Ho et al. 2020, Eq. 7: the posterior mean between the two levels (x0 itself after the last)
        x = (math.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)) * x
        if k + 1 < len(ts):
            var = (1.0 - a_prev) / (1.0 - a_t) * beta if variance == "fixed_small" else beta
            x = x + math.sqrt(var) * randn_like(x, generator)
        if callback is not None:
            callback(k, x, x0)
    return x
