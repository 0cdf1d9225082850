"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al. 2021).

Both are pure functions: ``sample(predict, schedule, x_T, steps, *, generator, callback)``
where ``predict(x_t, t) -> (eps, x0)`` (see :class:`~ddpmlab.samplers.base.ModelPredictor`)
and ``schedule`` is the full training schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ddpmlab.diffusion.process import extract, q_posterior
from ddpmlab.diffusion.schedules import NoiseSchedule, select_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import Callback, randn_like

VARIANCES = ("beta", "posterior", "learned")


@torch.no_grad()
def ddpm(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: Optional[int] = None, *,
         generator: Optional[torch.Generator] = None, callback: Callback = None,
         variance: str = "beta", spacing: str = "uniform") -> torch.Tensor:
    """Ancestral sampling of p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), x_T: (B, ...) -> x_0.

    variance: "beta" (sigma_t^2 = beta_t) or "posterior" (sigma_t^2 = beta_tilde_t), the two
    fixed choices of Ho et al. 2020, Sec. 3.2, or "learned" (the model's variance head,
    Nichol & Dhariwal 2021, Eq. 15; ``predict.with_log_variance``).  With steps < T the
    schedule is respaced (Nichol & Dhariwal 2021) and all variances are those of the
    respaced process: the learned one interpolates between its beta and beta_tilde.
    """
    if variance not in VARIANCES:
        raise ConfigError(f"unknown DDPM variance '{variance}'; choose one of {', '.join(VARIANCES)}")
    if variance == "learned" and not hasattr(predict, "with_log_variance"):
        raise ConfigError("DDPM variance 'learned' needs a ModelPredictor around a model with a variance head")
    T = schedule.num_timesteps
    s = schedule if steps is None or steps == T else schedule.respace(select_timesteps(T, steps, spacing))
    x = x_T
    n = s.num_timesteps
    for k, i in enumerate(range(n - 1, -1, -1)):
        t = s.timesteps[i].to(x.device)
        idx = torch.full((x.shape[0],), i, dtype=torch.long)
        if variance == "learned":
            eps, x0, log_var = predict.with_log_variance(x, t, schedule=s, index=idx)
        else:
            eps, x0 = predict(x, t)
        # Ho et al. 2020, Eq. 7 with x_0 predicted (equal to Eq. 11 when x0 is unclipped)
        mean, post_var, _ = q_posterior(s, x0, x, idx)
        if i > 0:
            if variance == "learned":
                var = torch.exp(log_var)
            else:
                var = extract(s.betas, idx, x) if variance == "beta" else post_var
            x = mean + var.sqrt() * randn_like(x, generator)
        else:
            x = mean
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
