"""Few-step students: the math of progressive and consistency distillation and their sampler.

Two kinds of student share one network interface (any denoiser ``model(x_t, t, y)`` whose output is
read through :class:`~ddpmlab.samplers.base.ModelPredictor` with the student's parameterisation, v or
x0, or a flow's velocity) and differ in how a step is taken:

* **progressive** (Salimans & Ho 2022): a student with N steps walks the grid of times u = k/N,
  k = N..1, in DDIM steps (their Eq. 7 form, eta = 0).  In training-time units the level u is
  t(u) = u T - 1 (fractional; t = -1 is clean data, alpha_bar = 1), so the grid of N levels is
  every other level of the grid of 2N: the halving rounds of their Algorithm 2.
* **consistency** (Song et al. 2023): in the variance-exploding view x = x_t / sqrt(alpha_bar) =
  x_0 + sigma eps, the consistency function is f(x, sigma) = c_skip(sigma) x + c_out(sigma) x0_hat(x,
  sigma) with c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2) (their App. C) and
  c_out = 1 - c_skip, so that f(x, sigma_min) = x holds exactly (c_skip = 1, c_out = 0 in floating
  point) and f is the student's x0 prediction at high noise (where a student initialised from its
  teacher starts as the teacher's one-step denoiser).  Sampling is their Algorithm 1.

Why the student predicts v (or x0), never eps: at SNR -> 0 an eps prediction says nothing about
x_0 (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies its error by 1 / sqrt(abar)), which a
one-step student must produce from pure noise (Salimans & Ho 2022, Sec. 4).  A student initialised
from an eps-teacher's weights reads the same network output as v: at high SNR v -> eps, so the
reading starts right where the teacher is reliable, and the first round trains the rest.

Flow teachers (diffusion.process=flow, :mod:`ddpmlab.diffusion.flow`): the student predicts the velocity
v = eps - x_0 as its teacher does (distill.prediction = velocity), so the weights it starts from are called
with the flow's own inputs (x_flow, t T) and its output is read as x0 = x_flow - t v by
:class:`~ddpmlab.samplers.base.ModelPredictor`.  The velocity is safe at few steps for the reason v is: the
error of x0 is t times that of v, never amplified (at t = 1, pure noise, x0 = x_T - v).  Both students walk
the VP view of the flow's schedule unchanged, and there they mean:

* progressive: the flow's grid t_i = (i + 1) / T puts the level u at flow time u, and a DDIM step (x0 and
  eps held fixed) is the Euler step of the flow ODE, x_t' = (1 - t') x0 + t' eps: an N-step student is N
  Euler steps of its velocity on t = k/N, trained on two Euler steps of its teacher's.
* consistency: f = c_skip x + c_out x0_hat as above, with x0_hat = x_flow - t v_theta, so the boundary
  condition still holds exactly at sigma_min (t = 1/T).  The top level sigma_max is the cap of the
  schedule's log-sigma table, 4096 (t = 4096/4097 = 1 - 2.4e-4: pure noise), where c_skip = 1.5e-8: a
  one-step sample is x - t v_theta(x, t) there up to 1e-4 x_T, one Euler step of the student's velocity
  from noise to data, the form of a one-step rectified-flow (reflow) sample (Liu et al. 2023), so the
  two compare on the same footing.  (Up to 4096 the Karras levels put nearly half of them above t = 0.99.)

Both students' top level, training time T - 1 read by the log-sigma interpolation, is that same
t = 1 - 2.4e-4 (the flow samplers read the table there: alpha_bar = 0, t = 1); training and sampling
agree on it.

Classifier-free guidance: the student takes the label like its teacher and is distilled on the
teacher's own conditional and "no label" predictions (labels dropped as in training), so guidance at
sampling combines the student's conditional and unconditional outputs (Ho & Salimans 2022, Eq. 6)
through the usual :func:`~ddpmlab.samplers.guidance.guided` wrapper.  For a one-step student this is
the guided combination of two one-step maps, an approximation of the guided ODE's flow map.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ddpmlab.config import DISTILL_METHODS, ODE_SOLVERS
from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t, sigma_of_t, t_of_sigma
from ddpmlab.errors import OPTION, ConfigError, OptionError
from ddpmlab.samplers.base import Callback, randn_like
from ddpmlab.samplers.solvers import euler_heun_step
from ddpmlab.samplers.steps import karras_sigmas


def is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


# --- progressive distillation (Salimans & Ho 2022) ----------------------------------------------

def level_time(schedule: NoiseSchedule, u) -> torch.Tensor:
    """Training time t(u) = u T - 1 of the level u in [0, 1] (float64, any shape); u = 0 is clean data (t = -1)."""
    return torch.as_tensor(u, dtype=torch.float64) * schedule.num_timesteps - 1.0


def abar_of_level(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at training times t >= -1 (float64): abar_of_t on [0, T-1], 1 at t = -1 (clean data)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t < 0, torch.ones_like(t), abar_of_t(schedule, t.clamp(min=0)))


def ddim_move(x: torch.Tensor, x0: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from alpha_bar ``abar_from`` to ``abar_to`` (shapes broadcasting against x).

    Salimans & Ho 2022, Alg. 2: z' = alpha' x_hat + (sigma' / sigma) (z - alpha x_hat), with alpha =
    sqrt(abar), sigma = sqrt(1 - abar) (Song et al. 2021, Eq. 12 at eta = 0); their sigma, the
    standard deviation of the noise in z, is ``std`` here (not the VE noise level sigma below).
    """
    alpha, std = abar_from.sqrt(), (1 - abar_from).sqrt()
    alpha2, std2 = abar_to.sqrt(), (1 - abar_to).sqrt()
    return alpha2 * x0 + (std2 / std) * (x - alpha * x0)


def progressive_target(z: torch.Tensor, z_end: torch.Tensor, abar_t: torch.Tensor,
                       abar_end: torch.Tensor) -> torch.Tensor:
    """The x-target of Salimans & Ho 2022, Alg. 2:
    x_tilde = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha).

    One DDIM step of the student from z (at abar_t) with x_hat = x_tilde lands exactly on z'' (the
    teacher's two steps, at abar_end).  At the last step (abar_end = 1) it is z'' itself.
    """
    alpha, std = abar_t.sqrt(), (1 - abar_t).sqrt()
    alpha2, std2 = abar_end.sqrt(), (1 - abar_end).sqrt()
    ratio = std2 / std
    return (z_end - ratio * z) / (alpha2 - ratio * alpha)


def truncated_snr_weight(abar: torch.Tensor) -> torch.Tensor:
    # Salimans & Ho 2022, Sec. 4, "truncated SNR" weighting:
    # max(||x - x_hat||^2, ||eps - eps_hat||^2) = max(SNR, 1) ||x - x_hat||^2
    return (abar / (1 - abar)).clamp(min=1.0)


# --- consistency distillation (Song et al. 2023; Song & Dhariwal 2023) --------------------------

def sigma_range(schedule: NoiseSchedule) -> tuple:
    """(sigma_min, sigma_max) of the schedule's training grid, the ends a consistency model spans."""
    ends = sigma_of_t(schedule, torch.tensor([0.0, schedule.num_timesteps - 1.0]))
    return float(ends[0]), float(ends[1])


def karras_levels(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """The n training noise levels of consistency models (n,) float64, increasing from sigma_min
    to sigma_max (Song et al. 2023, Sec. 5: Karras et al. 2022, Eq. 5)."""
    return karras_sigmas(sigma_min, sigma_max, n, rho)


def curriculum_n(k: int, total: int, n_start: int, n_end: int) -> int:
    """Discretisation N at iteration k of ``total`` (Song & Dhariwal 2023, Sec. 3.4):
    N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1 / s0) + 1))."""
    doublings = int(math.floor(math.log2(max(n_end / n_start, 1.0)))) + 1
    k_prime = max(total // doublings, 1)
    return min(n_start * 2 ** (k // k_prime), n_end) + 1


def skip_out(sigma: torch.Tensor, sigma_min: float, sigma_data: float) -> tuple:
    """(c_skip, c_out) of the consistency function: c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)  # Song et al. 2023, App. C
    return c_skip, 1.0 - c_skip


def ve_x0(predict, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The denoiser's x0 for the VE-scaled x = x_t / sqrt(abar) at per-example noise levels sigma (B,)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    sig = sigma.to(torch.float64)
    scale = (1.0 / (1.0 + sig**2).sqrt()).to(x.dtype).reshape(shape)
    t = t_of_sigma_rows(predict.schedule, sig)
    return predict(x * scale, t)[1]


def t_of_sigma_rows(schedule: NoiseSchedule, sigma: torch.Tensor) -> torch.Tensor:
    """Fractional training times (B,) float64 of noise levels sigma (B,), on sigma's device."""
    return t_of_sigma(schedule, sigma.detach().double().cpu()).to(sigma.device)


def consistency_fn(predict, x: torch.Tensor, sigma: torch.Tensor, sigma_min: float,
                   sigma_data: float) -> torch.Tensor:
    """f(x, sigma) = c_skip x + c_out x0_hat(x, sigma): x (B, ...) VE-scaled, sigma (B,) -> (B, ...)."""
    c_skip, c_out = skip_out(sigma.to(torch.float64), sigma_min, sigma_data)
    shape = (-1,) + (1,) * (x.ndim - 1)
    c_skip, c_out = c_skip.to(x.dtype).reshape(shape), c_out.to(x.dtype).reshape(shape)
    at_min = (sigma <= sigma_min).reshape(shape)
    x0 = ve_x0(predict, x, sigma)
    # at sigma_min f is x itself; torch.where keeps it exact even where x0_hat is not finite
    return torch.where(at_min, x, c_skip * x + c_out * x0)


def ode_step(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, s_from: torch.Tensor,
             s_to: torch.Tensor, solver: str = "heun") -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from s_from to s_to (B,), s_to > 0.

    ``euler`` is DDIM (Karras et al. 2022, Alg. 1 without the correction), ``heun`` adds the trapezoidal
    correction (Alg. 1, lines 6-8): :func:`~ddpmlab.samplers.solvers.euler_heun_step` with a noise level per example.
    """
    if solver not in ODE_SOLVERS:
        raise ConfigError(f"distill.solver: unknown ODE solver '{solver}'; choose {' or '.join(ODE_SOLVERS)} "
                          "(euler is DDIM)")
    shape = (-1,) + (1,) * (x.ndim - 1)
    a, b = s_from.to(x.dtype).reshape(shape), s_to.to(x.dtype).reshape(shape)

    def denoise_rows(x_: torch.Tensor, _sigma: torch.Tensor, sigma_rows: torch.Tensor) -> torch.Tensor:
        return denoise(x_, sigma_rows)  # D at the noise levels (B,), not their broadcast copies

    return euler_heun_step(denoise_rows, x, a, b, s_from, s_to if solver == "heun" else None)[0]


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    # Song & Dhariwal 2023, Sec. 3.3: d(x, y) = sqrt(||x - y||^2 + c^2) - c, per example (B,)
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c


def default_huber_c(dim: int) -> float:
    """c = 0.00054 sqrt(d) (Song & Dhariwal 2023, Sec. 3.3) for data of ``dim`` numbers per example."""
    return 0.00054 * math.sqrt(dim)


def consistency_levels(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> list:
    """The ``steps`` noise levels of multistep consistency sampling, sigma_max first: the first
    ``steps`` of ``steps + 1`` Karras levels from sigma_max down to sigma_min."""
    smin, smax = sigma_range(schedule)
    return karras_levels(smin, smax, steps + 1, rho).flip(0)[:steps].tolist()


# --- the sampler -----------------------------------------------------------------------------

def check_student_steps(method: str, steps: int, distilled_steps: Optional[int]) -> None:
    """An OptionError about 'steps' for a step count a student cannot take (progressive: at most its
    distilled steps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OptionError("steps", f"{OPTION} must be a positive integer for the student sampler, got {steps!r}")
    if method == "progressive" and distilled_steps is not None and steps > distilled_steps:
        raise OptionError("steps", f"{OPTION} {steps}: this progressive student was distilled for {distilled_steps} "
                                   f"steps and cannot take more (its grid has {distilled_steps} levels); use "
                                   f"{OPTION} {distilled_steps} or fewer, or the teacher run for more steps")


@torch.no_grad()
def student(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: Optional[int] = None, *,
            generator: Optional[torch.Generator] = None, callback: Callback = None, method: str = "progressive",
            distilled_steps: Optional[int] = None, sigma_data: float = 0.5, rho: float = 7.0,
            spacing: Optional[str] = None) -> torch.Tensor:
    """Sample a distilled student in ``steps`` model evaluations, x_T: (B, ...) standard normal -> x_0.

    progressive: DDIM on the student's grid u = k/steps (Salimans & Ho 2022); ``steps`` at most the
    ``distilled_steps`` it was trained for.  consistency: Song et al. 2023, Alg. 1 (one step: f(x_T,
    sigma_max); more: re-noise to each next level and apply f again, drawing noise from ``generator``).
    """
    if spacing is not None:
        raise OptionError("step_schedule", f"{OPTION}: the student sampler uses the grid it was distilled on; drop it")
    if method not in DISTILL_METHODS:
        raise ConfigError(f"unknown student method '{method}'; choose {' or '.join(DISTILL_METHODS)}")
    steps = distilled_steps if steps is None else steps
    check_student_steps(method, steps, distilled_steps)
    b = x_T.shape[0]
    if method == "progressive":
        ts = level_time(schedule, torch.arange(steps, -1, -1, dtype=torch.float64) / steps)  # (steps + 1,)
        abar = abar_of_level(schedule, ts)
        x = x_T
        for k in range(steps):
            eps, x0 = predict(x, ts[k].expand(b).to(x.device))
            x = ddim_move(x, x0, abar[k].to(x.dtype), abar[k + 1].to(x.dtype)) if k < steps - 1 else x0
            if callback is not None:
                callback(k, x, x0)
        return x
    smin, smax = sigma_range(schedule)
    levels = consistency_levels(schedule, steps, rho)
    x = x_T * math.sqrt(1.0 + smax**2)  # the VE-scaled start: x_T / sqrt(abar(sigma_max))
    x0 = x
    for k, sigma in enumerate(levels):
        if k > 0:  # Alg. 1, line 5: x = x0 + sqrt(tau^2 - sigma_min^2) z
            x = x0 + math.sqrt(max(sigma**2 - smin**2, 0.0)) * randn_like(x0, generator)
        x0 = consistency_fn(predict, x, torch.full((b,), sigma, dtype=torch.float64, device=x.device), smin,
                            sigma_data)
        if callback is not None:
            callback(k, x0 if k == steps - 1 else x / math.sqrt(1.0 + sigma**2), x0)
    return x0
