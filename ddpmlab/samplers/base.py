"""What every sampler shares: the (eps, x0) predictor around a network, limits on x0, and noise."""

from __future__ import annotations

import copy
import functools
from typing import Callable, Optional, Tuple

import torch

from ddpmlab.diffusion.process import eps_from_x0, eps_x0_from_output, network_inputs
from ddpmlab.diffusion.reverse import learned_log_variance, split_output
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError

Callback = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]


class ModelPredictor:
    """Turns a denoiser network ``model(x_t, t, y)`` into the pair (eps, x0) samplers use.

    This is the one place where a network's output parameterisation (eps, x0, v or a flow's
    velocity) is interpreted (compare EDM's preconditioning wrapper); a flow's network is called with
    its own inputs, x_flow at time t * T (:func:`~ddpmlab.diffusion.process.network_inputs`), so every
    sampler runs a flow run through the VP view of its schedule.  ``t`` is a training-time
    index into the *full* ``schedule``; ``clip_x0`` clamps the predicted x0 to the data
    range (images: [-1, 1]) and re-derives eps from it, as in Ho et al.'s sampler.
    ``threshold`` (a percentile p in (0, 1]) replaces that static clip by dynamic thresholding
    (:func:`dynamic_threshold`, Saharia et al. 2022) with the data range c = ``clip_x0`` or 1.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction: str = "eps",
                 y: Optional[torch.Tensor] = None, clip_x0: Optional[float] = None,
                 threshold: Optional[float] = None):
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.y = y
        self.clip_x0 = clip_x0
        self.threshold = None if threshold is None else check_threshold(threshold)

    def limit(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
              x0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) with x0 thresholded dynamically or clipped, and eps re-derived from it (else unchanged)."""
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, self.threshold, 1.0 if self.clip_x0 is None else self.clip_x0)
        elif self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        else:
            return eps, x0
        return eps_from_x0(self.schedule, x_t, t, x0), x0

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
        x_in, t_in = network_inputs(self.schedule, x_t, t, self.prediction)
        out = split_output(self.model(x_in, t_in, self.y), x_t)[0]  # a variance head's half is not used here
        eps, x0 = eps_x0_from_output(self.schedule, x_t, t, out.to(x_t.dtype), self.prediction)
        return self.limit(x_t, t, eps, x0)

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
        eps, x0 = self.limit(x_t, t, *eps_x0_from_output(self.schedule, x_t, t, pred.to(x_t.dtype), self.prediction))
        schedule = self.schedule if schedule is None else schedule
        return eps, x0, learned_log_variance(schedule, t if index is None else index, v_raw.to(x_t.dtype))


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn from ``generator`` on its own device."""
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


# --- dynamic thresholding (Saharia et al. 2022, "Imagen", Sec. 2.3) -------------------------------

def check_threshold(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ConfigError(f"threshold (the percentile of dynamic thresholding) must be in (0, 1], got {p!r}; "
                          "Saharia et al. use 0.995")
    return float(p)


def dynamic_threshold(x0: torch.Tensor, p: float, c: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding of predicted x0: (B, ...) -> (B, ...) within [-c, c].

    Per sample, s = max(quantile_p(|x0|), c); x0 is clipped to [-s, s] and scaled by c / s
    (Saharia et al. 2022, Sec. 2.3, with the data range [-c, c]; c = 1 for images).  Where
    quantile_p(|x0|) <= c nothing changes; p = 1 rescales only samples that leave [-c, c].
    """
    p = check_threshold(p)
    if c <= 0:
        raise ConfigError(f"the data range of dynamic thresholding must be > 0, got {c}")
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.to(torch.float64 if x0.device.type != "mps" else torch.float32), p, dim=1)
    s = s.clamp(min=c).to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) * (c / s)


class _Thresholded:
    """A plain predict(x_t, t) -> (eps, x0) with dynamic thresholding of x0 (data range [-1, 1])."""

    def __init__(self, predict: Callable, schedule: NoiseSchedule, p: float):
        self.predict, self.schedule, self.p = predict, schedule, check_threshold(p)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _, x0 = self.predict(x_t, t)
        x0 = dynamic_threshold(x0, self.p)
        t = torch.as_tensor(t)
        t = (t.to(torch.float64) if t.is_floating_point() else t.long()).to(x_t.device)
        return eps_from_x0(self.schedule, x_t, t.expand(x_t.shape[0]) if t.ndim == 0 else t, x0), x0


def thresholded(predict: Callable, schedule: NoiseSchedule, p: float) -> Callable:
    """``predict`` with dynamic thresholding at percentile p: a copy of a :class:`ModelPredictor`
    (its ``clip_x0`` becomes the data range) or a wrapper around any other predictor."""
    if isinstance(predict, ModelPredictor):
        out = copy.copy(predict)
        out.threshold = check_threshold(p)
        return out
    return _Thresholded(predict, schedule, p)


def with_threshold(fn: Callable) -> Callable:
    """The sampler ``fn`` with one more option, ``threshold=p``: dynamic thresholding of every x0 it sees."""

    @functools.wraps(fn)  # keeps __name__ and the ``levels`` attribute
    def sample(predict, schedule: NoiseSchedule, x_T: torch.Tensor, *args, threshold: Optional[float] = None,
               **options) -> torch.Tensor:
        if threshold is not None:
            predict = thresholded(predict, schedule, threshold)
        return fn(predict, schedule, x_T, *args, **options)

    return sample
