"""Stochastic solvers: DPM-Solver++(2M) SDE, Restart sampling, and the EDM stochastic sampler.

A deterministic solver carries every error of the model's x0 prediction along its path to the
end; a sampler that adds fresh noise while it removes noise lets later steps contract earlier
errors away (Karras et al. 2022, Sec. 4; Xu et al. 2023).  The three samplers here trade some
discretisation accuracy on exact scores for that robustness on learned ones.

They share the conventions of :mod:`ddpmlab.samplers.solvers`: ``steps`` model evaluations
(NFE), a step schedule ``timesteps=`` of :mod:`ddpmlab.samplers.steps`, and the
variance-exploding view x = x_t / sqrt(abar_t) = x_0 + sigma eps, in which the probability-flow
ODE is dx/dsigma = (x - D(x; sigma)) / sigma with D the model's x0 prediction.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from ddpmlab.config import ODE_SOLVERS
from ddpmlab.diffusion.schedules import NoiseSchedule, t_of_sigma
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import Callback, randn_like
from ddpmlab.samplers.solvers import euler_heun_step, heun, ve_denoiser
from ddpmlab.samplers.steps import Timesteps, check_steps, karras_sigmas, resolve_timesteps, sigmas_for


def _report(callback: Callback, k: int, x: torch.Tensor, sigma: float, x0: torch.Tensor) -> None:
    if callback is not None:  # callbacks see the variance-preserving x_t, as for every sampler
        callback(k, x / math.sqrt(1.0 + sigma**2), x0)


def _nonnegative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


# --- DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", Sec. 5 / App. B) ------------------------
# The reverse SDEs with the marginals of the data's diffusion form a family
#   dx = (1 + eta) (D - x) dlambda + sqrt(2 eta) sigma dW,    lambda = -log sigma,
# eta = 0 the probability-flow ODE, eta = 1 the reverse diffusion SDE.  Over a step of length h
# its linear part is solved exactly: with a = (1 + eta) h,
#   x_t = e^{-a} x_s + int_0^h (1 + eta) e^{-(1 + eta)(h - u)} D(lambda_s + u) du + sigma_t sqrt(1 - e^{-2 eta h}) z.
# D constant gives the first-order step (1 - e^{-a}) D; D linear through the last two x0
# predictions, D(lambda_s + u) = m0 + (u / h) (m0 - m1) / r, adds the correction
#   midpoint: (1 - e^{-a}) / 2 * (m0 - m1) / r     (as DPM-Solver++(2M), Alg. 2: exact for eta = 0 at first order)
#   heun:     (a - 1 + e^{-a}) / a * (m0 - m1) / r  (the exact integral of the linear D).

@torch.no_grad()
def dpmpp_2m_sde(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, *,
                 generator: Optional[torch.Generator] = None, callback: Callback = None,
                 timesteps: Timesteps = "logsnr", eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint", s_tmin: float = 0.0, s_tmax: float = math.inf) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: second-order multistep steps of the reverse SDE, NFE = steps.

    ``eta``: 0 is the probability-flow ODE (with ``solver_type="midpoint"`` exactly
    :func:`~ddpmlab.samplers.solvers.dpmpp_2m`), 1 the reverse diffusion SDE; ``s_noise`` scales
    the injected noise.  ``s_tmin``/``s_tmax``: the SDE only on steps that start at a (VE) noise
    level sigma in [s_tmin, s_tmax], the ODE (eta 0) on the others, as EDM's churn window
    (Karras et al. 2022, Alg. 2).  x_T: (B, ...) -> x_0.
    """
    _nonnegative("eta", eta)
    _nonnegative("s_noise", s_noise)
    _nonnegative("s_tmin", s_tmin)
    if not (isinstance(s_tmax, (int, float)) and not isinstance(s_tmax, bool) and s_tmax >= s_tmin):
        raise ConfigError(f"s_tmax must be a number >= s_tmin ({s_tmin}), got {s_tmax!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ConfigError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    ts = resolve_timesteps(timesteps, schedule, steps)
    sig = sigmas_for(schedule, ts).tolist()
    x, denoise = x_T * math.sqrt(1.0 + sig[0] ** 2), ve_denoiser(predict)
    m_prev, h_prev = None, None
    for i in range(steps):
        x0 = denoise(x, sig[i], ts[i])
        if sig[i + 1] == 0:
            x = x0  # the final step to sigma = 0 is the x0 prediction itself
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            e = eta if s_tmin <= sig[i] <= s_tmax else 0.0
            a = (1 + e) * h
            x = math.exp(-a) * x - math.expm1(-a) * x0
            if m_prev is not None:
                r = h_prev / h
                c = -math.expm1(-a) / 2 if solver_type == "midpoint" else (a + math.expm1(-a)) / a
                x = x + c / r * (x0 - m_prev)
            if e > 0 and s_noise > 0:
                x = x + sig[i + 1] * math.sqrt(-math.expm1(-2 * e * h)) * s_noise * randn_like(x, generator)
            m_prev, h_prev = x0, h
        _report(callback, i, x, sig[i + 1], x0)
    return x



# --- Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes") ----
# The main backward ODE solve stops at the level sigma_lo nearest to s_min; there, K times, the
# forward process adds noise up to s_max in one jump (x + sqrt(s_max^2 - sigma_lo^2) z, exact for
# the VE diffusion) and the ODE is solved back down to sigma_lo on restart_steps Karras steps.  The
# added noise contracts the error accumulated so far (their Theorem 2); the ODE keeps each leg's
# discretisation error small.  Defaults: one interval [0.06, 0.30] with K = 2 restarts of 3 Heun
# steps, the scale of Xu et al.'s CIFAR-10 settings.

def _restart_plan(steps: int, solver: str, restarts: int, restart_steps: int):
    """(main noise levels, restarts that fit): at least half of the NFE and 2 levels stay with the main solve."""
    per_level = 2 if solver == "heun" else 1
    leg = per_level * restart_steps  # a leg ends above sigma = 0: every Heun step costs 2 evaluations
    k = max(0, min(restarts, (steps - max(per_level * 2, (steps + 1) // 2)) // leg))
    left = steps - k * leg
    return (left + 1) // 2 if solver == "heun" else left, k


@torch.no_grad()
def restart(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, *,
            generator: Optional[torch.Generator] = None, callback: Callback = None,
            timesteps: Timesteps = "karras", solver: str = "heun", s_min: float = 0.06, s_max: float = 0.30,
            restarts: int = 2, restart_steps: int = 3, s_noise: float = 1.0) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, Alg. 1) with a Heun (or Euler) ODE solver, NFE <= steps.

    The main solve runs on ``timesteps``; at its level nearest to ``s_min`` (a VE sigma) the
    sample is noised up to ``s_max`` and re-solved down, ``restarts`` times, each leg on
    ``restart_steps`` Karras steps (2 evaluations each with Heun).  Restarts the NFE budget cannot
    pay for while keeping at least half of it for the main solve are dropped (few NFE: the plain
    ODE solve); ``restarts=0`` is exactly :func:`~ddpmlab.samplers.solvers.heun` (or ``euler``).
    """
    if solver not in ODE_SOLVERS:
        raise ConfigError(f"restart solver must be {' or '.join(ODE_SOLVERS)}, got {solver!r}")
    for name, v in (("restarts", restarts), ("restart_steps", restart_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "restarts" else 1):
            raise ConfigError(f"{name} must be an integer >= {0 if name == 'restarts' else 1}, got {v!r}")
    _nonnegative("s_noise", s_noise)
    if not 0 < s_min < s_max:
        raise ConfigError(f"the restart interval needs 0 < s_min < s_max, got s_min={s_min}, s_max={s_max}")
    check_steps(steps, schedule)
    levels, k_restarts = _restart_plan(steps, solver, restarts, restart_steps)
    ts = resolve_timesteps(timesteps, schedule, levels)
    sig = sigmas_for(schedule, ts).tolist()
    x, denoise = x_T * math.sqrt(1.0 + sig[0] ** 2), ve_denoiser(predict)
    heun_steps = solver == "heun"
    # the restart point: the main level (above sigma = 0, below the first) nearest to s_min in log sigma
    inner = range(1, levels)
    j = min(inner, key=lambda i: abs(math.log(sig[i] / s_min)), default=None)
    if j is None or sig[j] >= s_max:
        k_restarts = 0
    leg_sig: List[float] = []
    leg_ts = None
    if k_restarts:
        leg = karras_sigmas(s_max, sig[j], restart_steps + 1)  # from s_max down to the restart point sig[j]
        leg[-1] = sig[j]
        leg_sig, leg_ts = leg.tolist(), t_of_sigma(schedule, leg)
        leg_ts[-1] = ts[j]
    k = 0
    for i in range(levels):
        t_next = ts[i + 1] if heun_steps and sig[i + 1] > 0 else None
        x, x0 = euler_heun_step(denoise, x, sig[i], sig[i + 1], ts[i], t_next)
        _report(callback, k, x, sig[i + 1], x0)
        k += 1
        if i + 1 == j:
            for _ in range(k_restarts):
                # forward jump sig[j] -> s_max of the VE diffusion, then the ODE back down
                x = x + math.sqrt(s_max**2 - sig[j] ** 2) * s_noise * randn_like(x, generator)
                for m in range(restart_steps):
                    t_next = leg_ts[m + 1] if heun_steps else None
                    x, x0 = euler_heun_step(denoise, x, leg_sig[m], leg_sig[m + 1], leg_ts[m], t_next)
                    _report(callback, k, x, leg_sig[m + 1], x0)
                    k += 1
    return x


def _restart_levels(steps: int, solver: str = "heun", restarts: int = 2, restart_steps: int = 3, **_) -> int:
    levels, k = _restart_plan(steps, solver, restarts, restart_steps)
    return levels + k * restart_steps  # callbacks: main levels plus the restart legs' steps (upper bound)


restart.levels = _restart_levels


# --- the EDM stochastic sampler (Karras et al. 2022, Alg. 2) ---------------------------------------

@torch.no_grad()
def edm(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 49, *,
        generator: Optional[torch.Generator] = None, callback: Callback = None,
        timesteps: Timesteps = "karras", s_churn: float = 30.0, s_tmin: float = 0.01, s_tmax: float = 1.0,
        s_noise: float = 1.007) -> torch.Tensor:
    """The EDM stochastic sampler: Heun steps with churn (Karras et al. 2022, Alg. 2), NFE as ``heun``.

    At each level sigma_i in [s_tmin, s_tmax] the sample is noised up to (1 + gamma) sigma_i,
    gamma = min(s_churn / N, sqrt(2) - 1), with noise scaled by s_noise, before the Heun step.
    The defaults are the paper's for its VP model on CIFAR-10 (Table 5: S_churn 30, S_tmin 0.01,
    S_tmax 1, S_noise 1.007): churn only at low noise, where it repairs fine detail.  This is
    ``heun`` with churn switched on, the same code (``solvers.churn``); s_churn = 0 is ``heun``.
    """
    return heun(predict, schedule, x_T, steps, generator=generator, callback=callback, timesteps=timesteps,
                s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


edm.levels = heun.levels
