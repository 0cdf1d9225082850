"""Where a sampler meets the model's error: denoising error per noise level, and each level's gain.

A sample's error is the model's error at each noise level the sampler visits, times how much of an
error made there survives to the end.  The two factors are measured separately here.

:func:`denoising_errors` -- the model's side.  On data x0 noised to x_t = sqrt(abar) x0 +
sqrt(1 - abar) eps it reports, per timestep, the eps mean-squared error, the RMSE of the x0
prediction, and the *orthogonality defect* 2 E[eps_hat . (eps_hat - eps)] per coordinate.  The
Bayes-optimal predictor E[eps | x_t] makes eps - eps_hat orthogonal to every function of x_t, so
its defect is 0 whatever the data; a model that over-predicts the noise (removes too much) has a
positive defect, one that under-predicts it (leaves noise in) a negative one.  Unlike the MSE,
which contains the unknown irreducible error, the defect needs no reference.

:func:`error_gains` -- the sampler's side.  From the same x_T (and, for a stochastic sampler, the
same noise draws) the sampler is run once as is and once per model evaluation k with a fixed
perturbation e of RMS ``size`` added to the x0 prediction of evaluation k only (eps re-derived
from it).  The gain of level k is RMS(final difference) / size: how much of an x0 error made at
that noise level is still in the sample.  On Gaussian data the probability-flow ODE carries an
error made at sigma down with the factor s / sqrt(s^2 + sigma^2), the reverse SDE with
s^2 / (s^2 + sigma^2): noise injection contracts errors (Xu et al. 2023, Thm. 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ddpmlab.diffusion.process import eps_from_x0, q_sample
from ddpmlab.diffusion.schedules import NoiseSchedule, sigma_of_t
from ddpmlab.errors import ConfigError

Predict = Callable[[torch.Tensor, torch.Tensor], tuple]


@dataclass
class LevelError:
    """The model's error at one timestep t (VE noise level sigma), averaged per coordinate."""

    t: int
    sigma: float
    eps_mse: float
    x0_rmse: float
    defect: float  # 2 E[eps_hat . (eps_hat - eps)] / d: 0 for the Bayes-optimal predictor
    defect_se: float  # its standard error over the samples

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def denoising_errors(predict: Predict, schedule: NoiseSchedule, x0: torch.Tensor, ts: Sequence[int], *,
                     seed: int = 0, batch_size: int = 256,
                     make_predict: Optional[Callable] = None) -> List[LevelError]:
    """Per timestep in ``ts``, the errors of ``predict(x_t, t) -> (eps, x0)`` on the data ``x0`` (N, ...).

    The noise is drawn from ``seed`` (the same eps for every t).  ``make_predict(rows)``, if given,
    returns the predictor for a batch of rows (e.g. with those rows' labels) instead of ``predict``.
    """
    if len(x0) < 2:
        raise ConfigError(f"denoising_errors needs at least 2 data points, got {len(x0)}")
    n_t = schedule.num_timesteps
    bad = [t for t in ts if not 0 <= int(t) < n_t]
    if bad:
        raise ConfigError(f"timesteps {bad} are outside 0..{n_t - 1}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    out = []
    for t in ts:
        sq, x0_sq, dots = [], [], []
        for start in range(0, len(x0), batch_size):
            rows = slice(start, start + batch_size)
            xb, eb = x0[rows], noise[rows]
            tt = torch.full((len(xb),), int(t), dtype=torch.long)
            x_t = q_sample(schedule, xb, tt, eb)
            fn = predict if make_predict is None else make_predict(rows)
            eps_hat, x0_hat = fn(x_t, tt)
            flat = lambda a: a.reshape(len(xb), -1).double()  # noqa: E731
            sq.append(((flat(eps_hat) - flat(eb)) ** 2).mean(1))
            x0_sq.append(((flat(x0_hat) - flat(xb)) ** 2).mean(1))
            dots.append(2 * (flat(eps_hat) * (flat(eps_hat) - flat(eb))).mean(1))
        d = torch.cat(dots)
        out.append(LevelError(int(t), float(sigma_of_t(schedule, torch.tensor(float(t)))),
                              float(torch.cat(sq).mean()), float(torch.cat(x0_sq).mean().sqrt()),
                              float(d.mean()), float(d.std() / math.sqrt(len(d)))))
    return out


class _Perturbed:
    """``predict`` with ``delta`` added to the x0 prediction of call ``at`` (eps re-derived); records each call's t."""

    def __init__(self, predict: Predict, schedule: NoiseSchedule, at: Optional[int], delta: torch.Tensor):
        self.predict, self.schedule, self.at, self.delta = predict, schedule, at, delta
        self.ts: List[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor):
        eps, x0 = self.predict(x_t, t)
        k = len(self.ts)
        self.ts.append(torch.as_tensor(t).reshape(-1)[0].detach().double().cpu())
        if k == self.at:
            x0 = x0 + self.delta.to(x0)
            eps = eps_from_x0(self.schedule, x_t, torch.as_tensor(t, device=x_t.device).expand(len(x_t)), x0)
        return eps, x0


@dataclass
class LevelGain:
    """How much of an x0 error at model evaluation ``call`` (noise level ``sigma``) reaches the sample."""

    call: int
    t: float
    sigma: float
    gain: float

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


def error_gains(sampler: Callable, predict: Predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int, *,
                size: float = 0.01, seed: int = 0, calls: Optional[Sequence[int]] = None,
                **options) -> List[LevelGain]:
    """Per model evaluation of ``sampler(predict, schedule, x_T, steps, generator=..., **options)``, the gain
    RMS(x_final' - x_final) / size of an x0 error of RMS ``size`` (a fixed Gaussian direction, drawn
    from ``seed``) made at that evaluation only; ``calls``: which evaluations (default all)."""
    if not size > 0:
        raise ConfigError(f"the perturbation size must be > 0, got {size}")
    direction = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    direction = direction / direction.reshape(len(x_T), -1).pow(2).mean(1).sqrt().reshape(-1, *[1] * (x_T.ndim - 1))
    delta = (size * direction).to(x_T.dtype)

    def run(at: Optional[int]):
        p = _Perturbed(predict, schedule, at, delta)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            return sampler(p, schedule, x_T, steps, generator=gen, **options), p.ts

    base, ts = run(None)
    out = []
    for k in range(len(ts)) if calls is None else calls:
        if not 0 <= k < len(ts):
            raise ConfigError(f"call {k} does not exist: this sampler makes {len(ts)} model evaluations")
        x, _ = run(k)
        diff = (x - base).reshape(len(x), -1).double().pow(2).mean().sqrt()
        t = float(ts[k])
        out.append(LevelGain(k, t, float(sigma_of_t(schedule, torch.tensor(t))), float(diff) / size))
    return out
