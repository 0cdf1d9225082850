"""How straight a flow's ODE paths are: the straightness S(Z) of Liu et al. 2023 ("Flow Straight and Fast"),

    S(Z) = int_0^1 E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt,

zero exactly when every path is a straight line travelled at constant speed, so that one Euler step lands
where the ODE does.  Reflow lowers it (:mod:`ddpmlab.training.tasks.reflow`).

It is estimated on the path that Euler steps of the model's velocity take (:mod:`ddpmlab.samplers.flow`:
the path ``flow_euler`` takes, from noise x_T at t = t_0, 1 on a flow run, to x_0 at t = 0).  With the
velocity v_k at t_k and h_k = t_k - t_{k+1} > 0, the displacement is d = x_T - x_0 = sum_k h_k v_k and the
rectangle rule of the integral is

    S = sum_k h_k ||d / H - v_k||^2 = sum_k h_k ||v_k||^2 - ||d||^2 / H,   H = sum_k h_k = t_0,

the velocity's variance along the path (ddpmlab's t runs from the data to the noise, Liu et al.'s the other
way: both terms change sign, the norm does not).  Sampling with more steps makes the estimate finer.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.samplers.flow import flow_times, velocity
from ddpmlab.samplers.steps import Timesteps, check_steps


@torch.no_grad()
def straightness(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 100, *,
                 timesteps: Timesteps = "flow", shift: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S (B,) float64, x_0 (B, ...)): each path's straightness, summed over the D dimensions of a sample as
    Liu et al. sum it (divide by D for a per-dimension figure), and where the path ends (the samples of
    ``flow_euler`` with the same ``steps``, ``timesteps`` and ``shift``).

    ``predict``: the (eps, x0) predictor every sampler takes (:class:`~ddpmlab.samplers.base.ModelPredictor`
    of a flow run, or of any run: then the straightness of its probability-flow ODE in straight-path
    coordinates).  x_T: (B, ...) standard normal, as the samplers take it.
    """
    t = flow_times(schedule, check_steps(steps, schedule), timesteps, shift).tolist()
    x = x_T * math.sqrt((1.0 - t[0]) ** 2 + t[0] ** 2)  # flow coordinates, as flow_euler starts
    start = x.double()
    v_sq = torch.zeros(len(x), dtype=torch.float64, device=x.device)  # sum_k h_k ||v_k||^2
    for k in range(steps):
        h = t[k] - t[k + 1]
        v, _ = velocity(predict, schedule, x, t[k])
        v_sq += h * v.double().flatten(1).pow(2).sum(1)
        x = x - h * v  # an Euler step of dx/dt = v towards t = 0
    d = (start - x.double()).flatten(1)  # x_T - x_0 = sum_k h_k v_k
    return (v_sq - d.pow(2).sum(1) / t[0]).clamp_min(0.0), x
