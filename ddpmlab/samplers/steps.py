"""Step schedules: at which noise levels a solver evaluates the model, chosen apart from the solver.

A step schedule for ``n`` model evaluations is a decreasing tensor of ``n`` training times
(n,) float64 in [0, T-1]; integer-valued for the classic spacings, fractional for schedules
defined by noise level (Karras, log-SNR), which the model sees through the log-sigma
interpolation of :mod:`ddpmlab.schedules`.  Solvers append the final noise level sigma = 0
(the clean sample) themselves.

``STEP_SCHEDULES[name](schedule, n)`` is the registry; ``"optimized"`` depends on the model
and the solver and is computed by :func:`optimize_timesteps` (see its docstring).
"""

from __future__ import annotations

import difflib
import math
from typing import Callable, Dict, Sequence, Union

import torch

from ddpmlab.diffusion.flow import flow_time_of_abar
from ddpmlab.diffusion.schedules import (
    NoiseSchedule,
    log_sigmas,
    select_timesteps,
    sigma_of_t,
    t_of_sigma,
)
from ddpmlab.errors import ConfigError

Timesteps = Union[str, Sequence[float], torch.Tensor]


def _integer_spacing(spacing: str) -> Callable[[NoiseSchedule, int], torch.Tensor]:
    def make(schedule: NoiseSchedule, n: int) -> torch.Tensor:
        return select_timesteps(schedule.num_timesteps, n, spacing).flip(0).to(torch.float64)

    make.__doc__ = f"The '{spacing}' integer timesteps of schedules.select_timesteps, decreasing."
    return make


def linspace_timesteps(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n of n+1 rounded points of linspace(0, T-1), without t=0 (diffusers' default "linspace")."""
    T = schedule.num_timesteps
    return torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:n]


def karras_sigmas(sigma_first, sigma_last, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels (n,) float64 from sigma_first to sigma_last (either way), evenly spaced in sigma^(1/rho).

    Karras et al. 2022, Eq. 5: sigma_i = (sigma_first^(1/rho) + i/(n-1) (sigma_last^(1/rho) - sigma_first^(1/rho)))^rho.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    return (sigma_first ** (1 / rho) + ramp * (sigma_last ** (1 / rho) - sigma_first ** (1 / rho))) ** rho


def karras_timesteps(schedule: NoiseSchedule, n: int, rho: float = 7.0) -> torch.Tensor:
    """The timesteps of n Karras noise levels from the schedule's sigma_max down to its sigma_min."""
    ls = log_sigmas(schedule)
    return t_of_sigma(schedule, karras_sigmas(ls[-1].exp(), ls[0].exp(), n, rho))


def logsnr_timesteps(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    # Lu et al. 2022 (DPM-Solver, "logSNR" steps): lambda = -log sigma uniform from lambda_max to lambda_min
    ls = log_sigmas(schedule)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    return t_of_sigma(schedule, (ls[-1] + ramp * (ls[0] - ls[-1])).exp())


def flow_timesteps(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n levels evenly spaced in flow time t = sigma / (1 + sigma) (:mod:`ddpmlab.diffusion.flow`), from the
    schedule's top (t = 1 on a flow run: pure noise) down to its lowest level: on a flow run the grid
    linspace(1, 1/T, n) of diffusers' FlowMatchEulerDiscreteScheduler (Liu et al. 2023's uniform Euler steps)."""
    abar = schedule.alphas_cumprod
    top, bottom = flow_time_of_abar(abar[-1]), flow_time_of_abar(abar[0])
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    t = top + ramp * (bottom - top)
    return t_of_sigma(schedule, t / (1.0 - t))  # t = 1: sigma = inf, the schedule's last timestep


# Kong et al. 2021, App. B: the vocoder's fast sampling, T_infer = 6 user-defined betas (for T = 50 training steps)
DIFFWAVE_FAST_BETAS = (1e-4, 1e-3, 1e-2, 5e-2, 0.2, 0.5)


def diffwave_timesteps(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """The training times (n,) of DiffWave's fast-sampling noise levels, decreasing: gamma_s = prod_{i<=s}
    (1 - beta_i) of the paper's six betas (Kong et al. 2021, App. B; alpha_bar from 0.9999 down to 0.376);
    for n != 6, n levels piecewise linear in log sigma through those six.  Each level's time is where the
    schedule's alpha_bar equals it (the paper's t_align, here by the solvers' log-sigma interpolation rather
    than theirs in sqrt(alpha_bar); a fraction of a step apart)."""
    gamma = torch.cumprod(1.0 - torch.tensor(DIFFWAVE_FAST_BETAS, dtype=torch.float64), 0)
    log_sigma = 0.5 * torch.log((1.0 - gamma) / gamma)  # increasing
    pos = torch.linspace(0, len(gamma) - 1, n, dtype=torch.float64) if n > 1 else torch.full((1,), len(gamma) - 1.0)
    lo = pos.floor().long().clamp(max=len(gamma) - 2)
    w = pos - lo
    return t_of_sigma(schedule, ((1 - w) * log_sigma[lo] + w * log_sigma[lo + 1]).exp()).flip(0)


def _needs_model(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    raise ConfigError("timesteps 'optimized' depends on the model and the solver: compute it with "
                      "ddpmlab.samplers.steps.optimize_timesteps(...) and pass the tensor as timesteps= "
                      "(`ddpm sample --timesteps optimized` does this)")


STEP_SCHEDULES: Dict[str, Callable[[NoiseSchedule, int], torch.Tensor]] = {
    "uniform": _integer_spacing("uniform"),
    "leading": _integer_spacing("leading"),
    "trailing": _integer_spacing("trailing"),
    "linspace": linspace_timesteps,
    "karras": karras_timesteps,
    "logsnr": logsnr_timesteps,
    "flow": flow_timesteps,
    "diffwave": diffwave_timesteps,
    "optimized": _needs_model,
}


def check_steps(steps, schedule: NoiseSchedule, name: str = "steps") -> int:
    T = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ConfigError(f"{name} must be an integer between 1 and {T} (the model's num_timesteps), got {steps!r}")
    return steps


def resolve_timesteps(timesteps: Timesteps, schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """The n training times (n,) float64, decreasing, of a named schedule or an explicit list."""
    n = check_steps(n, schedule, "steps (model evaluations)")
    if isinstance(timesteps, str):
        if timesteps not in STEP_SCHEDULES:
            close = difflib.get_close_matches(timesteps, list(STEP_SCHEDULES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown timesteps '{timesteps}'{hint} (available: {', '.join(STEP_SCHEDULES)})")
        return STEP_SCHEDULES[timesteps](schedule, n)
    ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
    T = schedule.num_timesteps
    if len(ts) != n:
        raise ConfigError(f"timesteps: {len(ts)} values given for {n} model evaluations")
    if len(ts) and (ts.min() < 0 or ts.max() > T - 1 or (len(ts) > 1 and (ts[1:] >= ts[:-1]).any())):
        raise ConfigError(f"timesteps must decrease strictly within [0, {T - 1}], got {ts.tolist()}")
    return ts


def sigmas_for(schedule: NoiseSchedule, ts: torch.Tensor) -> torch.Tensor:
    """Noise levels (n+1,) float64 of training times ts (n,), with the final sigma = 0 appended."""
    return torch.cat([sigma_of_t(schedule, ts), torch.zeros(1, dtype=torch.float64)])


# --- a step schedule optimised for a given model and solver -------------------------------------
# The solver's global error on a calibration batch, against a reference solution of the same ODE
# from the same noise (the same solver with many steps), is minimised over the shape of the
# schedule.  The n levels follow a monotone warp of the log-sigma range, s(u) piecewise linear in
# u = i / (n - 1) through K + 1 knots (K = min(n - 1, 8)); the last level may end above sigma(0),
# since the final step to sigma = 0 is the x0 prediction itself.  log-SNR-uniform steps are the
# starting point (the identity warp); coordinate search with shrinking steps does the rest.


def warp_timesteps(schedule: NoiseSchedule, n: int, theta: torch.Tensor) -> torch.Tensor:
    """Training times (n,) of the warp with parameters theta (K + 1,): K knot logits, one end offset.

    Knots c_k = sum_{j<k} softmax(theta[:K])_j, k = 0..K, map u in [0, 1] to s in [0, 1];
    level i sits at log sigma = log sigma_max + s(i / (n - 1)) (log sigma_end - log sigma_max),
    log sigma_end = log sigma(0) + |theta[K]|.  theta = 0 is log-SNR-uniform steps.
    """
    ls = log_sigmas(schedule)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    w = torch.softmax(theta[:-1], 0)
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])  # (K + 1,)
    k = len(w)
    u = torch.linspace(0, 1, n, dtype=torch.float64) * k if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo = u.floor().long().clamp(max=k - 1)
    s = knots[lo] + (u - lo) * (knots[lo + 1] - knots[lo])
    end = torch.minimum(ls[0] + theta[-1].abs(), ls[-1])
    return t_of_sigma(schedule, (ls[-1] + s * (end - ls[-1])).exp())


def optimize_timesteps(predict, schedule: NoiseSchedule, sampler: Callable, steps: int, x_cal: torch.Tensor, *,
                       reference_steps: int = 200, sweeps: int = 8, knots: int = 8, verbose: bool = False,
                       **options) -> torch.Tensor:
    """A step schedule (training times, as for ``timesteps=``) minimising the error of ``sampler``
    with ``steps`` NFE on the calibration noise x_cal: (B, ...).

    error = mean over the batch of ||x_0(schedule) - x_0(reference)||^2, the reference being the
    same sampler on log-SNR steps with ``reference_steps`` NFE from the same x_cal.  Cost:
    ``reference_steps`` + at most ``sweeps * 2 * (K + 1) * steps`` model evaluations on the batch.
    The noise must be other than the noise sampled with later, or the schedule fits that noise.
    ``sampler`` must be deterministic: ``SamplerSpec.stochastic`` says which are, and
    ``SamplerSpec.check_step_schedule`` refuses ``optimized`` for the others.
    """
    check_steps(steps, schedule)
    if options.get("s_churn", 0) > 0:
        raise ConfigError("timesteps 'optimized' are fitted to deterministic solvers (dpmpp_2m, dpmpp_3m, unipc, "
                          "euler, heun without churn); choose another schedule for stochastic sampling")
    ref = sampler(predict, schedule, x_cal, min(reference_steps, schedule.num_timesteps), timesteps="logsnr",
                  **options)
    n = levels_for(sampler, steps, **options)
    if n < 2:
        return resolve_timesteps("logsnr", schedule, n)

    def error(theta: torch.Tensor) -> float:
        ts = warp_timesteps(schedule, n, theta)
        if len(ts) > 1 and bool((ts[1:] >= ts[:-1]).any()):
            return math.inf  # levels merged: not a valid schedule
        x = sampler(predict, schedule, x_cal, steps, timesteps=ts, **options)
        return float((x - ref).pow(2).flatten(1).sum(1).mean())

    theta = torch.zeros(min(n - 1, knots) + 1, dtype=torch.float64)  # start: log-SNR-uniform steps
    best = error(theta)
    delta = 1.0
    for sweep in range(sweeps):
        improved = False
        for j in range(len(theta)):
            for sign in (1.0, -1.0):
                trial = theta.clone()
                trial[j] += sign * delta
                e = error(trial)
                if e < best:
                    theta, best, improved = trial, e, True
                    break
        if verbose:
            print(f"  sweep {sweep}: error {best:.3e} (step {delta:g})")
        if not improved:
            delta /= 2
    return warp_timesteps(schedule, n, theta)


def levels_for(sampler: Callable, steps: int, **options) -> int:
    """Noise levels a sampler's step schedule has for ``steps`` NFE (``sampler.levels`` where a
    solver spends more than one evaluation per level, e.g. Heun)."""
    levels = getattr(sampler, "levels", None)
    return levels(steps, **options) if levels is not None else steps
