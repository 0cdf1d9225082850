"""Training objectives (Ho et al. 2020, Algorithm 1) for eps / x0 / v parameterisations."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .process import q_sample, training_target
from .schedules import NoiseSchedule

LOSSES = ("l2", "l1")


def sample_timesteps(batch: int, T: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T}); indices 0..T-1 here
    return torch.randint(0, T, (batch,), device=device, generator=generator)


def per_example_loss(output: torch.Tensor, target: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Mean over all but the batch dimension of the squared (l2) or absolute (l1) error: (B,)."""
    diff = output - target
    if loss == "l2":
        err = diff.pow(2)
    elif loss == "l1":
        err = diff.abs()
    else:
        raise ValueError(f"unknown loss '{loss}'; choose one of {', '.join(LOSSES)}")
    return err.flatten(1).mean(1)


def diffusion_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *,
                   t: torch.Tensor, noise: torch.Tensor, y: Optional[torch.Tensor] = None,
                   prediction: str = "eps", loss: str = "l2") -> torch.Tensor:
    """The simple loss L_simple of Ho et al. 2020, Eq. 14, for one batch: a scalar.

    x0: (B, ...) data; t: (B,) timesteps; noise: like x0. With prediction='eps' this is
    ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 (Algorithm 1, line 5).
    """
    x_t = q_sample(schedule, x0, t, noise)
    out = model(x_t, t, y)
    target = training_target(schedule, x0, t, noise, prediction)
    return per_example_loss(out.float(), target.float(), loss).mean()
