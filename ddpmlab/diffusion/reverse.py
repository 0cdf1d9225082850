"""The reverse process p(x_{t-1} | x_t): network output split, variances, one ancestral step."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ddpmlab.diffusion.process import extract, q_posterior
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import OPTION, DDPMError, OptionError

# the reverse variance sigma_t^2, one vocabulary for config (diffusion.variance) and samplers:
# beta_t (Ho et al. 2020, Sec. 3.2, "fixed_large"), the posterior beta_tilde_t ("fixed_small"),
# or the model's variance head (Nichol & Dhariwal 2021, Eq. 15, "learned_range")
VARIANCES = ("fixed_large", "fixed_small", "learned_range")


def split_output(out: torch.Tensor, x_t: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A network output -> (mean part, variance part or None).

    A model with a variance head outputs twice ``x_t``'s channels (dim 1): the first
    half is its eps / x0 / v prediction, the second the raw interpolation value.
    """
    if out.shape == x_t.shape:
        return out, None
    c = x_t.shape[1]
    if out.shape[1] == 2 * c and out.shape[2:] == x_t.shape[2:]:
        return out[:, :c], out[:, c:]
    raise ValueError(f"model output of shape {tuple(out.shape)} does not fit x_t of shape {tuple(x_t.shape)}")


def check_variance(name: str) -> str:
    """``name`` if it is a reverse variance of :data:`VARIANCES`, else an OptionError about 'variance'."""
    if name not in VARIANCES:
        raise OptionError("variance", f"{OPTION}: unknown variance '{name}'; choose one of {', '.join(VARIANCES)}")
    return name


def ancestral_step(s: NoiseSchedule, x_t: torch.Tensor, i: int, x0: torch.Tensor, variance: str,
                   log_var: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_{t-1} ~ p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0), sigma_t^2 I) at entry ``i`` of ``s``.

    Ho et al. 2020, Eq. 7 with x_0 predicted (Eq. 11 when x0 is unclipped), Algorithm 2:
    sigma_t^2 = beta_t ("fixed_large"), beta_tilde_t ("fixed_small"), or exp(``log_var``) of a
    variance head ("learned_range").  Entry 0 returns the mean (no noise at the last step).
    x_t, x0, noise, log_var: (B, ...).
    """
    idx = torch.full((x_t.shape[0],), i, dtype=torch.long)
    mean, post_var, _ = q_posterior(s, x0, x_t, idx)
    if i == 0:
        return mean
    if variance == "learned_range":
        if log_var is None:
            raise DDPMError("the learned variance needs the model's log-variance (a model trained with "
                            "diffusion.variance=learned_range)")
        var = torch.exp(log_var)
    else:
        var = extract(s.betas, idx, x_t) if variance == "fixed_large" else post_var
    return mean + var.sqrt() * noise


def fixed_log_variance(s: NoiseSchedule, i: torch.Tensor, like: torch.Tensor, variance: str) -> torch.Tensor:
    """log sigma_t^2 of a fixed variance, broadcast like ``like`` (Ho et al. 2020, Sec. 3.2)."""
    if variance == "fixed_small":  # sigma_t^2 = beta_tilde_t (beta_tilde_0 = 0 clipped to beta_tilde_1)
        return extract(s.posterior_log_variance_clipped, i, like)
    if variance == "fixed_large":  # sigma_t^2 = beta_t; at t = 1 beta_tilde_1, as improved-diffusion
        log_beta = torch.log(torch.cat([s.posterior_variance[1:2], s.betas[1:]])) if s.num_timesteps > 1 \
            else torch.log(s.betas)
        return extract(log_beta, i, like)
    raise ValueError(f"unknown fixed variance '{variance}'; choose fixed_small or fixed_large")


def learned_log_variance(s: NoiseSchedule, i: torch.Tensor, v_raw: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta = v log beta_t + (1 - v) log beta_tilde_t with v = (v_raw + 1) / 2.

    Nichol & Dhariwal 2021, Eq. 15; the raw output in [-1, 1] spans [beta_tilde_t, beta_t]
    (the network may go beyond).  Both bounds are those of ``s``, so a respaced schedule
    re-derives the variance for its own, longer steps.
    """
    v = (v_raw + 1.0) / 2.0
    max_log = extract(torch.log(s.betas), i, v_raw)
    min_log = extract(s.posterior_log_variance_clipped, i, v_raw)
    return v * max_log + (1.0 - v) * min_log


def interpolation_for(s: NoiseSchedule, i: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The raw output v_raw in :func:`learned_log_variance` that gives ``log_var`` (its inverse)."""
    max_log = extract(torch.log(s.betas), i, log_var)
    min_log = extract(s.posterior_log_variance_clipped, i, log_var)
    return 2.0 * (log_var - min_log) / (max_log - min_log) - 1.0


def reverse_log_variance(s: NoiseSchedule, i: torch.Tensor, like: torch.Tensor, variance: str,
                         v_raw: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) for any ``diffusion.variance`` kind."""
    if variance == "learned_range":
        if v_raw is None:
            raise DDPMError("diffusion.variance is learned_range but the model has no variance head "
                            "(its output has the data's channels); retrain it or use a fixed variance")
        return learned_log_variance(s, i, v_raw)
    return fixed_log_variance(s, i, like, variance)


def p_mean_log_variance(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, x0: torch.Tensor, variance: str,
                        v_raw: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of p_theta(x_{t-1} | x_t) from the predicted x_0.

    Ho et al. 2020, Eq. 11 written through Eq. 7: mu_theta = mu_tilde(x_t, x0_theta).
    """
    mean, _, _ = q_posterior(s, x0, x_t, i)
    return mean, reverse_log_variance(s, i, x_t, variance, v_raw)
