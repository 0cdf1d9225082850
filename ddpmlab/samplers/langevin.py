"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

The score view of a DDPM: s(x_t, t) = grad log q(x_t) = -eps(x_t, t) / sqrt(1 - abar_t).  At
each noise level, Langevin MCMC steps (the corrector) pull x towards the marginal q(x_t);
then one step of the discretised reverse VP SDE (the predictor) moves to the next level.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import Callback, randn_like
from ddpmlab.samplers.steps import Timesteps, check_steps, resolve_timesteps

PREDICTORS = ("reverse_diffusion", "ancestral")


def _mean_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm averaged over the batch, (B, ...) -> scalar."""
    return v.reshape(v.shape[0], -1).norm(dim=1).mean()


def langevin_step(score: torch.Tensor, x: torch.Tensor, alpha: float, snr: float,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """One Langevin step towards the density whose score is ``score`` (x, score: (B, ...)).

    The step size uses batch-mean norms, as the authors' code: a per-sample ratio ||z|| / ||s||
    explodes for samples near a mode in low dimension.
    """
    # Song et al. 2021, Alg. 3 (VP corrector): eps = 2 alpha (r ||z|| / ||s||)^2, x + eps s + sqrt(2 eps) z
    z = randn_like(x, generator)
    step = 2 * alpha * (snr * _mean_norm(z) / _mean_norm(score).clamp_min(1e-12)) ** 2
    return x + step * score + (2 * step).sqrt() * z


def predictor_step(score: torch.Tensor, x: torch.Tensor, beta: float, noise: bool, kind: str,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """One reverse VP SDE step with beta = 1 - abar_next / abar_now; the last step adds no noise."""
    if kind == "reverse_diffusion":
        # Song et al. 2021, Alg. 3 (VP predictor): (2 - sqrt(1 - beta)) x + beta s + sqrt(beta) z
        mean = (2 - math.sqrt(1 - beta)) * x + beta * score
    else:
        # ancestral sampling (Ho et al. 2020, Eq. 11 in score form): (x + beta s) / sqrt(1 - beta)
        mean = (x + beta * score) / math.sqrt(1 - beta)
    return mean + math.sqrt(beta) * randn_like(x, generator) if noise else mean


@torch.no_grad()
def pc(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 1000, *,
       generator: Optional[torch.Generator] = None, callback: Callback = None,
       timesteps: Timesteps = "uniform", snr: float = 0.16, corrector_steps: int = 1,
       predictor: str = "reverse_diffusion") -> torch.Tensor:
    """Predictor-corrector sampler (Song et al. 2021, Alg. 3 for the VP SDE), x_T: (B, ...) -> x_0.

    ``steps`` counts model evaluations: N = steps // (corrector_steps + 1) noise levels, each
    with ``corrector_steps`` Langevin steps of signal-to-noise ratio ``snr`` and one predictor
    step (``reverse_diffusion`` as in Alg. 3, or ``ancestral``, the DDPM step, which is more
    accurate for large respaced betas).  As in the authors' code, each level corrects first
    and then predicts, so the last predictor step (to the data, without noise) ends the chain.
    """
    if snr < 0:
        raise ConfigError(f"pc snr must be >= 0, got {snr}")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ConfigError(f"pc corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if predictor not in PREDICTORS:
        raise ConfigError(f"unknown pc predictor '{predictor}'; choose one of {', '.join(PREDICTORS)}")
    check_steps(steps, schedule)
    levels = pc.levels(steps, corrector_steps)
    ts = resolve_timesteps(timesteps, schedule, levels)
    abar = abar_of_t(schedule, ts).tolist() + [1.0]
    x = x_T

    def score_at(x: torch.Tensor, k: int):
        eps, x0 = predict(x, ts[k])
        return -eps / math.sqrt(1 - abar[k]), x0  # the score of q(x_t): -eps / sqrt(1 - abar)

    for k in range(levels):
        beta = 1 - abar[k] / abar[k + 1]
        for _ in range(corrector_steps):
            x = langevin_step(score_at(x, k)[0], x, 1 - beta, snr, generator)
        score, x0 = score_at(x, k)
        x = predictor_step(score, x, beta, k < levels - 1, predictor, generator)
        if callback is not None:
            callback(k, x, x0)
    return x


pc.levels = lambda steps, corrector_steps=1, **options: max(1, steps // (corrector_steps + 1))
