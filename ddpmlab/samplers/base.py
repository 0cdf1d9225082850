"""What every sampler shares: the (eps, x0) predictor around a network, and noise."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..process import eps_from_x0, eps_x0_from_output
from ..schedules import NoiseSchedule

Callback = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]


class ModelPredictor:
    """Turns a denoiser network ``model(x_t, t, y)`` into the pair (eps, x0) samplers use.

    This is the one place where a network's output parameterisation (eps, x0 or v) is
    interpreted (compare EDM's preconditioning wrapper).  ``t`` is a training-time
    index into the *full* ``schedule``; ``clip_x0`` clamps the predicted x0 to the data
    range (images: [-1, 1]) and re-derives eps from it, as in Ho et al.'s sampler.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction: str = "eps",
                 y: Optional[torch.Tensor] = None, clip_x0: Optional[float] = None):
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.y = y
        self.clip_x0 = clip_x0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x_t: (B, ...), t: (B,) or scalar long -> eps, x0 with x_t's shape."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.model(x_t, t, self.y)
        eps, x0 = eps_x0_from_output(self.schedule, x_t, t, out.to(x_t.dtype), self.prediction)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = eps_from_x0(self.schedule, x_t, t, x0)
        return eps, x0


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn from ``generator`` on its own device."""
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)
