"""Flow matching (Lipman et al. 2023) and rectified flow (Liu et al. 2023): the straight path from data to noise.

The forward process is x_t = (1 - t) x_0 + t eps with continuous t in [0, 1], and the network learns the
velocity of that path, v = dx_t/dt = eps - x_0 (Liu et al. 2023, Eq. 1; Lipman et al. 2023, Eq. 20-23
with sigma_min = 0).  Both papers run t from noise at 0 to data at 1; ddpmlab writes it in SD3's direction
(Esser et al. 2024: t = 1 is pure noise), as its diffusion's t runs.  Generation integrates
dx/dt = v(x, t) from t = 1 down to 0.

The marginals are those of a variance-preserving diffusion, rescaled.  With a = sqrt(abar) and
b = sqrt(1 - abar) the VP x_t = a x_0 + b eps, and

    t = b / (a + b),   x_flow = x_VP / (a + b),   abar = (1 - t)^2 / ((1 - t)^2 + t^2),

so sigma = t / (1 - t) and x_VE = x_flow / (1 - t) = x_0 + sigma eps in the variance-exploding view.
x_0 = x_t - t v and eps = x_t + (1 - t) v are the same at every parameterisation: this change of
variables lets every sampler of :mod:`ddpmlab.samplers` run a flow model unchanged
(:func:`~ddpmlab.diffusion.process.network_inputs`).

The network's time input is ``t * T`` (T = diffusion.num_timesteps): the range of the integer timesteps
its sinusoidal embedding was built for, and the ``timestep = sigma * num_train_timesteps`` of SD3 and of
diffusers' FlowMatchEulerDiscreteScheduler.  Pure tensor functions; no other ddpmlab module is imported.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# how t is drawn in training: uniform, logit-normal (Esser et al. 2024, Eq. 19), mode (Eq. 20)
FLOW_T_SAMPLING = ("uniform", "logit_normal", "mode")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))  # f_mode is a bijection of [0, 1] only for s in this range


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B,) or scalar shaped (B, 1, ..., 1) in x's dtype, to broadcast against x (B, ...)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def flow_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Liu et al. 2023, Eq. 1 / Lipman et al. 2023, Eq. 20-21 (sigma_min = 0), t reversed: x_t = (1 - t) x_0 + t eps
    t = _like(t, x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Liu et al. 2023, Eq. 1 (t reversed): the velocity of the straight path, dx_t/dt = eps - x_0
    return noise - x0


def x0_eps_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) of a velocity v at x_t: x_0 = x_t - t v, eps = x_t + (1 - t) v (x_t = (1 - t) x_0 + t eps)."""
    t = _like(t, x_t)
    return x_t - t * v, x_t + (1.0 - t) * v


def abar_of_flow_time(t: torch.Tensor) -> torch.Tensor:
    """alpha_bar of the VP diffusion with the marginals of flow time t: (1 - t)^2 / ((1 - t)^2 + t^2)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return (1.0 - t) ** 2 / ((1.0 - t) ** 2 + t**2)


def flow_time_of_abar(abar: torch.Tensor) -> torch.Tensor:
    """The flow time t = b / (a + b) of a VP noise level alpha_bar (a = sqrt(abar), b = sqrt(1 - abar))."""
    a, b = abar.sqrt(), (1.0 - abar).sqrt()
    return b / (a + b)


def flow_from_vp(x_vp: torch.Tensor, abar: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_flow, t) of the VP x_t at alpha_bar ``abar`` (broadcasting against x_vp): x_flow = x_VP / (a + b)."""
    a, b = abar.sqrt(), (1.0 - abar).sqrt()
    return x_vp / (a + b), b / (a + b)


def vp_from_flow(x_flow: torch.Tensor, t) -> torch.Tensor:
    """The VP x_t of x_flow at flow time t: x_flow (a + b) = x_flow / sqrt((1 - t)^2 + t^2)."""
    t = _like(t, x_flow) if torch.is_tensor(t) else t
    return x_flow / ((1.0 - t) ** 2 + t**2) ** 0.5


def network_time(t: torch.Tensor, T: int) -> torch.Tensor:
    """What the network sees as its timestep at flow time t: t * T (SD3's and diffusers' convention)."""
    return t * T


def flow_alphas_cumprod(T: int) -> torch.Tensor:
    """alpha_bar (T,) float64 of the flow on the grid t_i = (i + 1) / T, i = 0..T-1 (diffusers'
    FlowMatchEulerDiscreteScheduler's training sigmas): alpha_bar is 0 at t = 1, pure noise."""
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    return abar_of_flow_time(t)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift of a time grid towards noise, t' = s t / (1 + (s - 1) t) (Esser et al. 2024, Sec. 5.3.2;
    s = 1 leaves t unchanged, s = 3 is SD3's at 1024^2)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def mode_time(u: torch.Tensor, scale: float) -> torch.Tensor:
    # Esser et al. 2024, Eq. 20: f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)
    return 1.0 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1.0 + u)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    # Esser et al. 2024, Eq. 19: pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2))
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))


def sample_flow_times(kind: str, batch: int, *, generator: Optional[torch.Generator] = None, device=None,
                      mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """Training times t (batch,) float32 in [0, 1], drawn from ``generator`` (on its own device).

    ``uniform``: t ~ U[0, 1) (Lipman et al. 2023; Liu et al. 2023).  ``logit_normal``: logit(t) ~
    N(mean, std^2) (Esser et al. 2024, Eq. 19; SD3 takes mean 0, std 1).  ``mode``: t = f_mode(u; s),
    u ~ U[0, 1) (their Eq. 20, s = ``mode_scale``; s = 0 is uniform, s > 0 favours the middle).
    """
    dev = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=dev)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=dev))
    elif kind == "mode":
        t = mode_time(torch.rand(batch, generator=generator, device=dev), mode_scale)
    else:
        raise ValueError(f"unknown flow t_sampling '{kind}'; choose one of {', '.join(FLOW_T_SAMPLING)}")
    return t.to(device) if device is not None else t
