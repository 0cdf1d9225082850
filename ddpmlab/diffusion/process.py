"""Forward process, posterior and conversions between eps / x0 / v / velocity / score.

Pure tensor functions of a :class:`~ddpmlab.diffusion.schedules.NoiseSchedule`.  ``i`` is an
index into the schedule's entries (B,) long (for a full schedule equal to the
timestep t); coefficients are gathered in float64 and cast to ``x``'s dtype.  A flow run
(``diffusion.process: flow``, :mod:`ddpmlab.diffusion.flow`) is read through the VP view of its
schedule: :func:`network_inputs` turns the VP x_t into what its network takes, and the velocity it
returns converts to (eps, x0) like every other output.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ddpmlab.diffusion.flow import flow_from_vp, network_time, velocity_target, x0_eps_from_velocity
from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t

# ddpm: the diffusion of Ho et al. 2020 on diffusion.schedule; flow: flow matching / rectified flow
PROCESSES = ("ddpm", "flow")
# "edm": the network sits inside EDM's preconditioning (Karras et al. 2022, Table 1;
# ddpmlab.models.preconditioning), whose output is the denoised x0: it reads as x0 here;
# "velocity": a flow's network, eps - x_0 at (x_flow, t * T) (ddpmlab.diffusion.flow)
PREDICTIONS = ("eps", "x0", "v", "edm", "velocity")


def extract(arr: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``arr[i]`` reshaped to (B, 1, ..., 1) so that it broadcasts against ``like``."""
    i = torch.as_tensor(i, device=arr.device, dtype=torch.long)
    if i.ndim == 0:
        i = i.expand(like.shape[0])
    out = arr[i].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def abar_at(s: NoiseSchedule, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at integer indices ``i``, or at fractional training times (float ``i``,
    log-sigma interpolation: :func:`~ddpmlab.diffusion.schedules.abar_of_t`), shaped (B, 1, ..., 1) like ``like``."""
    i = torch.as_tensor(i)
    if not i.is_floating_point():
        return extract(s.alphas_cumprod, i, like)
    abar = abar_of_t(s, i).reshape(-1).expand(like.shape[0])
    return abar.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_mean_variance(s: NoiseSchedule, x0: torch.Tensor, i: torch.Tensor):
    # Ho et al. 2020, Eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    abar = extract(s.alphas_cumprod, i, x0)
    return abar.sqrt() * x0, 1.0 - abar


def q_sample(s: NoiseSchedule, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Ho et al. 2020, Eq. 4 reparameterised: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    abar = extract(s.alphas_cumprod, i, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def q_posterior(s: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 6-7)."""
    mean = extract(s.posterior_mean_coef1, i, x_t) * x0 + extract(s.posterior_mean_coef2, i, x_t) * x_t
    return mean, extract(s.posterior_variance, i, x_t), extract(s.posterior_log_variance_clipped, i, x_t)


def eps_from_x0(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    # Ho et al. 2020, Eq. 4 reparameterised, solved for eps
    abar = abar_at(s, i, x_t)
    return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()


def x0_from_eps(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    # Ho et al. 2020, Eq. 15 solved for x_0
    abar = abar_at(s, i, x_t)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def v_target(s: NoiseSchedule, x0: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    # Salimans & Ho 2022, Eq. 4 form: v = sqrt(abar) eps - sqrt(1 - abar) x_0
    abar = extract(s.alphas_cumprod, i, x0)
    return abar.sqrt() * eps - (1.0 - abar).sqrt() * x0


def x0_eps_from_v(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, v: torch.Tensor):
    # Salimans & Ho 2022, Sec. 4: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v
    abar = abar_at(s, i, x_t)
    a, b = abar.sqrt(), (1.0 - abar).sqrt()
    return a * x_t - b * v, b * x_t + a * v


def score_from_eps(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    # score of q(x_t | x_0) (Ho et al. 2020, Eq. 4): -(x_t - sqrt(abar_t) x_0) / (1 - abar_t)
    # = -eps / sqrt(1 - abar_t), the target of Song et al. 2021, Eq. 7
    return -eps / extract(1.0 - s.alphas_cumprod, i, x_t).sqrt()


def _flow_view(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_flow, t) of the VP x_t at entry or fractional time i, in float64 (float32 on mps); t broadcasts."""
    wide = torch.float32 if x_t.device.type == "mps" else torch.float64  # mps has no float64
    abar = abar_at(s, i, x_t.new_empty((x_t.shape[0],) + (1,) * (x_t.ndim - 1), dtype=wide))
    return flow_from_vp(x_t.to(wide), abar)


def network_inputs(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, prediction: str):
    """(x, t) the network is called with for the VP x_t at entry i: (x_t, i) itself, except for a flow's
    velocity network, which takes x_flow = x_t / (a + b) at time t * T, t = b / (a + b) (the change of
    variables of :mod:`ddpmlab.diffusion.flow`; a = sqrt(abar), b = sqrt(1 - abar), T the schedule's)."""
    if prediction != "velocity":
        return x_t, i
    x_flow, t = _flow_view(s, x_t, i)
    return x_flow.to(x_t.dtype), network_time(t.reshape(-1), s.num_timesteps)


def eps_x0_from_output(s: NoiseSchedule, x_t: torch.Tensor, i: torch.Tensor, out: torch.Tensor,
                       prediction: str):
    """Convert a network output of the given parameterisation into (eps, x0)."""
    if prediction == "velocity":  # x_0 = x_flow - t v, eps = x_flow + (1 - t) v: the same in every view
        x_flow, t = _flow_view(s, x_t, i)
        x0, eps = x0_eps_from_velocity(x_flow, t, out.to(x_flow.dtype))
        return eps.to(x_t.dtype), x0.to(x_t.dtype)
    if prediction == "eps":
        return out, x0_from_eps(s, x_t, i, out)
    if prediction in ("x0", "edm"):
        return eps_from_x0(s, x_t, i, out), out
    if prediction == "v":
        x0, eps = x0_eps_from_v(s, x_t, i, out)
        return eps, x0
    raise ValueError(f"unknown prediction type '{prediction}'; choose one of {', '.join(PREDICTIONS)}")


def training_target(s: NoiseSchedule, x0: torch.Tensor, i: torch.Tensor, eps: torch.Tensor,
                    prediction: str) -> torch.Tensor:
    """What the network is trained to output for a given parameterisation."""
    if prediction == "eps":
        return eps
    if prediction in ("x0", "edm"):
        return x0
    if prediction == "v":
        return v_target(s, x0, i, eps)
    if prediction == "velocity":
        return velocity_target(x0, eps)
    raise ValueError(f"unknown prediction type '{prediction}'; choose one of {', '.join(PREDICTIONS)}")


def edm_coefficients(s: NoiseSchedule, i: torch.Tensor, like: torch.Tensor, sigma_data: float):
    """EDM's preconditioning (Karras et al. 2022, Table 1) written for the VP x_t, shaped like ``like``.

    With sigma = sqrt((1 - abar) / abar) and the VE variable x = x_t / sqrt(abar), EDM's
    denoiser is D(x) = c_skip x + c_out F(c_in x).  In x_t terms (finite at abar = 0 and 1):
    c_in' = 1 / sqrt(1 - abar + abar sd^2) multiplies x_t at the network's input,
    c_skip' = sd^2 sqrt(abar) / (1 - abar + abar sd^2) multiplies x_t in D, and
    c_out = sd sqrt(1 - abar) / sqrt(1 - abar + abar sd^2), so that
    D = c_skip' x_t + c_out F(c_in' x_t).  Returns (c_in', c_skip', c_out).
    """
    abar = abar_at(s, i, like)
    sd2 = sigma_data * sigma_data
    denom = 1.0 - abar + abar * sd2
    return denom.rsqrt(), sd2 * abar.sqrt() / denom, sigma_data * (1.0 - abar).sqrt() * denom.rsqrt()
