"""Beta schedules and the frozen :class:`NoiseSchedule` every other module reads.

All quantities are computed in float64 (the cumulative product of 1000 terms loses
digits in float32) and cast once, where they are used, to the data's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from ddpmlab.diffusion.flow import flow_alphas_cumprod
from ddpmlab.errors import ConfigError

SCHEDULES = ("linear", "cosine", "sigmoid", "tanh", "quadratic")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    # Ho et al. 2020, Sec. 4: betas increasing linearly from 1e-4 to 0.02
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def quadratic_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    # linear in sqrt(beta) (the "scaled linear" schedule of latent diffusion)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    # beta_t = beta_start + (beta_end - beta_start) sigmoid(x_t), x_t evenly spaced over [-6, 6]:
    # slow at both ends, fastest in the middle
    s = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    return beta_start + (beta_end - beta_start) * s


def tanh_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    # a tanh ramp over [-3, 3], rescaled so that beta_1 = beta_start and beta_T = beta_end exactly
    s = (torch.tanh(torch.linspace(-3, 3, T, dtype=torch.float64)) + 1) / 2
    s = (s - s[0]) / (s[-1] - s[0])
    return beta_start + (beta_end - beta_start) * s


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def make_betas(name: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas (T,) float64 of the named schedule."""
    if T < 1:
        raise ConfigError(f"diffusion.num_timesteps must be >= 1, got {T}")
    if name == "linear":
        return linear_betas(T, beta_start, beta_end)
    if name == "quadratic":
        return quadratic_betas(T, beta_start, beta_end)
    if name == "sigmoid":
        return sigmoid_betas(T, beta_start, beta_end)
    if name == "tanh":
        return tanh_betas(T, beta_start, beta_end)
    if name == "cosine":
        return cosine_betas(T)
    raise ConfigError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas (T,) rescaled so that alpha_bar_T = 0: x_T is pure noise (Lin et al. 2024, Algorithm 1).

    sqrt(alpha_bar_t) is shifted so its last value is 0 and scaled so its first is unchanged;
    beta_T becomes 1.  The model must predict v or x0 (eps says nothing about x_0 at t = T).
    """
    abar_sqrt = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar = ((abar_sqrt - last) * first / (first - last)) ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete forward process of a DDPM, all tensors (N,) float64.

    ``timesteps[i]`` is the training-time index the model is called with at entry i:
    ``arange(T)`` for a full schedule, a sorted subset for a respaced one.
    """

    betas: torch.Tensor
    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor  # alpha_bar_t
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    posterior_variance: torch.Tensor  # beta_tilde_t, Ho et al. 2020 Eq. 7
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # multiplies x_0 in Eq. 7
    posterior_mean_coef2: torch.Tensor  # multiplies x_t in Eq. 7
    log_snr: torch.Tensor  # log(alpha_bar / (1 - alpha_bar))

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timesteps: Optional[torch.Tensor] = None) -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D tensor")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if timesteps is None:
            timesteps = torch.arange(len(betas))
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta_tilde_0 = 0: clip the log at the next value, as improved-diffusion does
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(betas) > 1 else torch.log(betas)
        return cls(
            betas=betas,
            timesteps=torch.as_tensor(timesteps, dtype=torch.long),
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_logvar,
            posterior_mean_coef1=betas * abar_prev.sqrt() / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            log_snr=torch.log(abar) - torch.log1p(-abar),
        )

    @classmethod
    def make(cls, name: str = "linear", T: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 0.02) -> "NoiseSchedule":
        return cls.from_betas(make_betas(name, T, beta_start, beta_end))

    @classmethod
    def from_alphas_cumprod(cls, abar: torch.Tensor) -> "NoiseSchedule":
        """The schedule of a decreasing alpha_bar (T,): beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}."""
        abar = torch.as_tensor(abar, dtype=torch.float64)
        return cls.from_betas(1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]))

    @classmethod
    def from_config(cls, diffusion_cfg) -> "NoiseSchedule":
        """diffusion.schedule's betas; a flow run (diffusion.process: flow) the VP view of its straight
        path on t_i = (i + 1) / T (:func:`~ddpmlab.diffusion.flow.flow_alphas_cumprod`)."""
        d = diffusion_cfg
        if d.process == "flow":
            return cls.from_alphas_cumprod(flow_alphas_cumprod(d.num_timesteps))
        betas = make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
        return cls.from_betas(rescale_zero_terminal_snr(betas) if d.zero_terminal_snr else betas)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def to(self, device) -> "NoiseSchedule":
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def respace(self, use_timesteps: Sequence[int]) -> "NoiseSchedule":
        """The schedule restricted to a subset of timesteps (Nichol & Dhariwal 2021, Sec. 4).

        New betas are ``1 - alpha_bar[s_i] / alpha_bar[s_{i-1}]`` so that alpha_bar at
        each kept step is unchanged; the model is still called with the original index.
        """
        idx = torch.as_tensor(sorted({int(t) for t in use_timesteps}), dtype=torch.long)
        if len(idx) == 0 or idx[0] < 0 or idx[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps - 1}]")
        abar = self.alphas_cumprod[idx]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule.from_betas(1.0 - abar / abar_prev, timesteps=self.timesteps[idx])


def select_timesteps(T: int, steps: int, spacing: str = "uniform") -> torch.Tensor:
    """``steps`` training indices out of ``T``, increasing, for a sampler's step schedule.

    ``uniform``: evenly spaced, always containing 0 and T-1 (improved-diffusion's
    respacing); ``leading``: ``arange(0, T, T//steps)`` (DDIM paper, diffusers
    "leading"); ``trailing``: ``round(arange(T, 0, -T/steps)) - 1`` (Lin et al. 2024).
    """
    if not isinstance(steps, int) or steps < 1 or steps > T:
        raise ConfigError(f"steps must be an integer between 1 and {T} (the model's num_timesteps), got {steps}")
    if spacing == "uniform":
        if steps == 1:
            return torch.tensor([T - 1])
        ts = torch.round(torch.linspace(0, T - 1, steps, dtype=torch.float64)).long()
    elif spacing == "leading":
        ts = torch.arange(0, steps) * (T // steps)
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)).long().flip(0) - 1
    else:
        raise ConfigError(f"unknown timestep spacing '{spacing}'; choose uniform, leading or trailing")
    return ts


# --- continuous time over the discrete grid -------------------------------------------------
# Solvers evaluate the model between training timesteps.  As k-diffusion's DiscreteSchedule
# does, the noise level sigma_t = sqrt((1 - abar_t) / abar_t) (the variance-exploding view,
# x_t / sqrt(abar_t) = x_0 + sigma_t eps) is interpolated linearly in log-sigma between
# integer t; a fractional t is what the model's sinusoidal embedding is called with.


# the largest noise level solvers see: alpha_bar = 2^-24 (sigma ~ 4096), where a zero-terminal-SNR
# schedule has alpha_bar_T = 0 and sigma_T = inf (diffusers' solvers clip it the same way)
MAX_LOG_SIGMA = 12 * math.log(2.0)


def log_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """log sigma_t on the training grid, (T,) float64, increasing in t: -log_snr / 2 (at most MAX_LOG_SIGMA)."""
    return (-0.5 * schedule.log_snr).clamp(max=MAX_LOG_SIGMA)


def sigma_of_t(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """sigma at fractional training times t in [0, T-1] (clamped), any shape, float64."""
    ls = log_sigmas(schedule)
    t = torch.as_tensor(t, dtype=torch.float64, device=ls.device).clamp(0, len(ls) - 1)
    if len(ls) == 1:
        return ls.exp().expand(t.shape).clone()
    lo = t.floor().long().clamp(max=len(ls) - 2)
    w = t - lo
    return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp()


def t_of_sigma(schedule: NoiseSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """Fractional training time of noise level sigma (the inverse of :func:`sigma_of_t`), float64.

    sigma outside [sigma(0), sigma(T-1)] maps to the nearest end of the grid.
    """
    ls = log_sigmas(schedule)
    x = torch.as_tensor(sigma, dtype=torch.float64, device=ls.device).log().clamp(ls[0], ls[-1])
    if len(ls) == 1:
        return torch.zeros_like(x)
    hi = torch.searchsorted(ls, x.contiguous()).clamp(1, len(ls) - 1)
    lo = hi - 1
    return lo + (x - ls[lo]) / (ls[hi] - ls[lo])


def abar_of_t(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at fractional training times: 1 / (1 + sigma_t^2), float64 (exact at integer t)."""
    return 1.0 / (1.0 + sigma_of_t(schedule, t) ** 2)
