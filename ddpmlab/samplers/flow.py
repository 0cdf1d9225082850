"""Samplers of the flow ODE dx/dt = v(x, t), integrated from t = 1 (noise) down to t = 0: Euler, Heun, midpoint;
and an SDE with the same marginals (Euler-Maruyama).

They work in the coordinates of flow matching / rectified flow (:mod:`ddpmlab.diffusion.flow`), x = (1 - t) x_0
+ t eps, where the velocity is v = eps - x_0.  That is the same for every parameterisation, so the velocity
comes from the (eps, x0) ``predict`` every sampler takes: on a flow run (prediction velocity) these integrate
its own ODE; on a DDPM run the probability-flow ODE in straight-path coordinates.  The predictor is called
with the VP x_t = x / sqrt((1 - t)^2 + t^2) at the schedule's training time of t, so that a flow network sees
exactly (x, t * T).

Step schedule: the flow times of ``timesteps`` (default ``flow``: uniform in t from the schedule's top, t = 1 on
a flow run, to its lowest level, as diffusers' FlowMatchEulerDiscreteScheduler; any other step schedule's noise
levels as t = sigma / (1 + sigma)), moved by SD3's shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024,
Sec. 5.3.2), then t = 0.  The schedule's last timestep is read from its table (alpha_bar = 0 on a flow run:
t = 1 exactly), every other time by the log-sigma interpolation all solvers use.  Callbacks see the VP x_t,
as for every sampler.

``flow_sde`` adds noise: Euler-Maruyama steps of a reverse-time SDE with the flow's marginals.  For any
diffusion coefficient g(t), dx = [v - (g^2 / 2) grad log p_t(x)] dt + g dW, run from t = 1 down to 0, has the
marginals of the ODE dx/dt = v (Song et al. 2021, Eq. 6 and 13: the reverse SDE of the forward SDE
dx = [v + (g^2 / 2) grad log p_t] dt + g dW, whose Fokker-Planck equation is the ODE's continuity equation).
On x_t = (1 - t) x_0 + t eps the score is -E[eps | x_t] / t, so the drift is v + (g^2 / (2 t)) eps.  ddpmlab
takes g^2 = 2 eta t: the drift is v + eta eps, bounded at t = 1 (pure noise, where the first step starts) and
as t -> 0.  The DDPM reverse SDE written in these coordinates has g^2 = 2 t / (1 - t): the same to first
order at low noise, where fresh noise repairs most, and infinite at t = 1.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ddpmlab.diffusion.flow import flow_time_of_abar, shift_time, vp_from_flow
from ddpmlab.diffusion.process import abar_at
from ddpmlab.diffusion.schedules import NoiseSchedule, t_of_sigma
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import Callback, randn_like
from ddpmlab.samplers.steps import Timesteps, check_steps, resolve_timesteps, sigmas_for


def flow_times(schedule: NoiseSchedule, n: int, timesteps: Timesteps = "flow", shift: float = 1.0) -> torch.Tensor:
    """The n + 1 flow times (float64, decreasing, the last 0) of step schedule ``timesteps`` with ``shift``."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0 or not math.isfinite(shift):
        raise ConfigError(f"shift must be a number > 0 (1: no shift; SD3 uses 3), got {shift!r}")
    ts = resolve_timesteps(timesteps, schedule, n)
    sigma = sigmas_for(schedule, ts)[:-1]
    t = sigma / (1.0 + sigma)
    t[ts >= schedule.num_timesteps - 1] = float(flow_time_of_abar(schedule.alphas_cumprod[-1]))
    return torch.cat([shift_time(t, float(shift)), torch.zeros(1, dtype=torch.float64)])


def _index(schedule: NoiseSchedule, t: float) -> torch.Tensor:
    """The training time of flow time t: the last timestep (long) at or above the schedule's top, else the
    fractional time of noise level sigma = t / (1 - t)."""
    T = schedule.num_timesteps
    if t >= float(flow_time_of_abar(schedule.alphas_cumprod[-1])):
        return torch.tensor(T - 1)
    return t_of_sigma(schedule, torch.tensor(t / (1.0 - t), dtype=torch.float64))


def velocity(predict, schedule: NoiseSchedule, x: torch.Tensor, t: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(v, x0) at flow time t for the flow-coordinate x (B, ...): v = eps - x0 of ``predict`` at the VP x_t."""
    i = _index(schedule, t)
    abar = float(abar_at(schedule, i, torch.zeros(1, dtype=torch.float64)))  # the alpha_bar predict reads at i
    eps, x0 = predict(x * (math.sqrt(abar) + math.sqrt(1.0 - abar)), i.to(x.device))
    return eps - x0, x0


def _integrate(predict, schedule: NoiseSchedule, x_T: torch.Tensor, levels: int, method: str, *,
               callback: Callback, timesteps: Timesteps, shift: float, eta: float = 0.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    t = flow_times(schedule, levels, timesteps, shift).tolist()
    x = x_T * math.sqrt((1.0 - t[0]) ** 2 + t[0] ** 2)  # the VP x_T in flow coordinates (x_T itself at t = 1)
    for k in range(levels):
        h = t[k + 1] - t[k]  # negative: from noise towards the data
        v, x0 = velocity(predict, schedule, x, t[k])
        if method == "sde" and eta > 0 and t[k + 1] > 0:
            # Euler-Maruyama on dx = [v - (g^2 / 2) score] dt + g dW with score = -eps / t, eps = v + x0, g^2 = 2 eta t
            # (the last step, to t = 0, is the ODE's Euler step below: x - t v = x0)
            x = x + h * (v + eta * (v + x0)) + math.sqrt(-2.0 * eta * t[k] * h) * randn_like(x, generator)
        elif method == "midpoint":  # the explicit midpoint rule: the slope at t + h/2
            v, _ = velocity(predict, schedule, x + h / 2 * v, t[k] + h / 2)
            x = x + h * v
        elif method == "heun" and t[k + 1] > 0:  # Heun's trapezoid (Karras et al. 2022, Alg. 1, lines 6-8)
            x_euler = x + h * v
            v2, _ = velocity(predict, schedule, x_euler, t[k + 1])
            x = x + h * (v + v2) / 2
        else:  # Euler; Heun's last step to t = 0 too, as Karras et al.'s
            x = x + h * v
        if callback is not None:
            callback(k, vp_from_flow(x, t[k + 1]), x0)
    return x


@torch.no_grad()
def flow_euler(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, *,
               generator: Optional[torch.Generator] = None, callback: Callback = None,
               timesteps: Timesteps = "flow", shift: float = 1.0) -> torch.Tensor:
    """Euler steps x <- x + (t_next - t) v(x, t) of the flow ODE (Liu et al. 2023, Sec. 2; SD3's sampler), NFE =
    steps.  On the same step schedule it is DDIM (eta 0) and ``euler``: x_next = (1 - t_next) x0 + t_next eps.
    x_T: (B, ...) standard normal -> x_0."""
    return _integrate(predict, schedule, x_T, check_steps(steps, schedule), "euler", callback=callback,
                      timesteps=timesteps, shift=shift)


@torch.no_grad()
def flow_heun(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 49, *,
              generator: Optional[torch.Generator] = None, callback: Callback = None,
              timesteps: Timesteps = "flow", shift: float = 1.0) -> torch.Tensor:
    """Heun's second-order method on the flow ODE; N levels cost 2N - 1 evaluations (the step to t = 0 is an
    Euler step), so ``steps`` NFE buy N = (steps + 1) // 2 levels, as for ``heun``."""
    check_steps(steps, schedule)
    return _integrate(predict, schedule, x_T, flow_heun.levels(steps), "heun", callback=callback,
                      timesteps=timesteps, shift=shift)


@torch.no_grad()
def flow_midpoint(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, *,
                  generator: Optional[torch.Generator] = None, callback: Callback = None,
                  timesteps: Timesteps = "flow", shift: float = 1.0) -> torch.Tensor:
    """The explicit midpoint method on the flow ODE (second order): two evaluations per level, at t and at
    t + h/2, so ``steps`` NFE buy max(1, steps // 2) levels (1 step: one level of 2 evaluations)."""
    check_steps(steps, schedule)
    return _integrate(predict, schedule, x_T, flow_midpoint.levels(steps), "midpoint", callback=callback,
                      timesteps=timesteps, shift=shift)


@torch.no_grad()
def flow_sde(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, *,
             generator: Optional[torch.Generator] = None, callback: Callback = None,
             timesteps: Timesteps = "flow", shift: float = 1.0, eta: float = 1.0) -> torch.Tensor:
    """Euler-Maruyama steps of the reverse-time SDE dx = (v + eta eps) dt + sqrt(2 eta t) dW from t = 1 to 0,
    which has the flow's marginals for every eta >= 0 (the module's text); NFE = steps, on the step schedule of
    ``flow_euler``.  eta 0 is ``flow_euler`` exactly; eta 1 (the default) matches the DDPM reverse SDE at low
    noise.  The last step, to t = 0, is the x0 prediction itself.  x_T: (B, ...) standard normal -> x_0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise ConfigError(f"eta must be a finite number >= 0 (0: flow_euler, 1: the default), got {eta!r}")
    return _integrate(predict, schedule, x_T, check_steps(steps, schedule), "sde", callback=callback,
                      timesteps=timesteps, shift=shift, eta=float(eta), generator=generator)


flow_heun.levels = lambda steps, **options: (steps + 1) // 2  # noise levels for `steps` NFE (steps.levels_for)
flow_midpoint.levels = lambda steps, **options: max(1, steps // 2)
