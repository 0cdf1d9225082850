"""What every sampler shares: the (eps, x0) predictor around a network, and noise."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ddpmlab.diffusion.process import eps_from_x0, eps_x0_from_output
from ddpmlab.diffusion.reverse import learned_log_variance, split_output
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError

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
        """x_t: (B, ...), t: (B,) or scalar -> eps, x0 with x_t's shape.

        Integer t are training timesteps; float t are fractional times between them (for
        continuous-time solvers): the model sees the fractional t, and abar comes from the
        log-sigma interpolation of :func:`~ddpmlab.diffusion.schedules.abar_of_t`.
        """
        t = torch.as_tensor(t)
        fdtype = torch.float32 if x_t.device.type == "mps" else torch.float64  # mps has no float64
        t = (t.to(fdtype) if t.is_floating_point() else t.long()).to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = split_output(self.model(x_t, t, self.y), x_t)[0]  # a variance head's half is not used here
        eps, x0 = eps_x0_from_output(self.schedule, x_t, t, out.to(x_t.dtype), self.prediction)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = eps_from_x0(self.schedule, x_t, t, x0)
        return eps, x0

    def with_log_variance(self, x_t: torch.Tensor, t: torch.Tensor, schedule: Optional[NoiseSchedule] = None,
                          index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps, x0, log sigma_t^2) of a model with a variance head (Nichol & Dhariwal 2021, Eq. 15).

        t: (B,) or scalar training index.  The log-variance interpolates between beta and
        beta_tilde of ``schedule`` at entry ``index`` (default: the full schedule at t); a
        respaced sampler passes its own schedule, which re-derives the variance for its steps.
        """
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        pred, v_raw = split_output(self.model(x_t, t, self.y), x_t)
        if v_raw is None:
            raise DDPMError("the learned-variance sampler needs a model trained with diffusion.variance=learned_range; "
                            "this model has no variance head: sample with variance beta or posterior")
        eps, x0 = eps_x0_from_output(self.schedule, x_t, t, pred.to(x_t.dtype), self.prediction)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = eps_from_x0(self.schedule, x_t, t, x0)
        s = self.schedule if schedule is None else schedule
        return eps, x0, learned_log_variance(s, t if index is None else index, v_raw.to(x_t.dtype))


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn from ``generator`` on its own device."""
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)
