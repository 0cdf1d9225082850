"""The variational bound of a DDPM, term by term, and bits per dimension.

Ho et al. 2020, Eq. 5 splits the negative ELBO of x_0 into

    L_vlb = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                          (prior)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  (Gaussian KLs)
    L_0     = -log p_theta(x_0 | x_1)                               (decoder, Eq. 13)

All Gaussians are diagonal, so every term is a sum over dimensions of closed-form
expressions.  Functions here return the *mean over dimensions* in nats, shape (B,);
:func:`bits_per_dim` converts.  ``i`` indexes the schedule's entries (0-based: entry 0
is the paper's t = 1), as everywhere in ddpmlab.

The reverse variance Sigma_theta(x_t, t) = sigma_t^2 I comes in three kinds
(``diffusion.variance``, :data:`ddpmlab.diffusion.reverse.VARIANCES`): ``fixed_large``
(beta_t, Ho et al.'s CIFAR-10 choice), ``fixed_small`` (beta_tilde_t) and ``learned_range``
(Nichol & Dhariwal 2021, Eq. 15: the network outputs v and
log sigma^2 = v log beta_t + (1 - v) log beta_tilde_t).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ddpmlab.diffusion.process import q_mean_variance, q_posterior
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError

DECODERS = ("discretized", "continuous")
LN2 = math.log(2.0)
EIGHT_BIT = 2.0 / 255.0  # bin width of 8-bit data scaled to [-1, 1] by x / 127.5 - 1


def bits_per_dim(nats_per_dim: torch.Tensor | float) -> torch.Tensor | float:
    """Nats per dimension -> bits per dimension (divide by ln 2)."""
    return nats_per_dim / LN2


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.flatten(1).mean(1)


# ---------------------------------------------------------------- Gaussian pieces

def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    # KL of two Gaussians: 1/2 [log s2^2/s1^2 + (s1^2 + (m1 - m2)^2) / s2^2 - 1]
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, e^log_var) elementwise: the continuous decoder, in nats."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(a) - Phi(b)) for a > b, without cancellation in either tail."""
    # reflect bins above the mean into the lower tail: Phi(a) - Phi(b) = Phi(-b) - Phi(-a)
    flip = b > 0
    hi, lo = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    # clamp: keeps the unused branch of torch.where below finite, and so its gradient
    return log_hi + torch.log((-torch.expm1(log_lo - log_hi)).clamp_min(torch.finfo(log_hi.dtype).tiny))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, *,
                                        bin_width: float = EIGHT_BIT, low: Optional[float] = -1.0,
                                        high: Optional[float] = 1.0) -> torch.Tensor:
    """log of the Gaussian's mass on the bin around x, elementwise, in nats (x on a grid).

    Ho et al. 2020, Eq. 13: p(x_0 | x_1) = integral over [x - w/2, x + w/2] of N(mean, var),
    with the first bin (x = low) reaching down to -inf and the last (x = high) up to +inf,
    so the masses of all bins sum to 1.  ``low`` / ``high`` None: an unbounded grid.
    Computed in float64 (float32 on MPS) with exact normal CDFs.
    """
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    x, mean, log_var = x.to(dtype), mean.to(dtype), log_var.to(dtype)
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x + bin_width / 2 - mean) * inv_std
    lower = (x - bin_width / 2 - mean) * inv_std
    inf = torch.full_like(upper, math.inf)
    if high is not None:
        upper = torch.where(x > high - bin_width / 2, inf, upper)
    if low is not None:
        lower = torch.where(x < low + bin_width / 2, -inf, lower)
    exact = _log_ndtr_diff(upper, lower)
    # bins far narrower than the Gaussian: the midpoint rule (relative error (w/sigma)^2 / 24)
    narrow = (upper - lower) < 1e-4
    midpoint = gaussian_log_likelihood(x, mean, log_var) + math.log(bin_width)
    return torch.where(narrow, midpoint, exact)


# ---------------------------------------------------------------- the terms of the bound

def prior_kl(s: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)), mean over dimensions in nats: (B,)."""
    last = torch.full((x0.shape[0],), s.num_timesteps - 1, dtype=torch.long)
    mean, var = q_mean_variance(s, x0, last)
    return mean_flat(normal_kl(mean, torch.log(var), torch.zeros_like(mean), torch.zeros_like(mean)))


def decoder_nll(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, decoder: str = "discretized",
                bin_width: float = EIGHT_BIT, bounded: bool = True) -> torch.Tensor:
    """L_0 = -log p_theta(x_0 | x_1), mean over dimensions in nats: (B,).

    ``discretized``: Eq. 13 with bins of ``bin_width`` (edges at -1 and 1 when ``bounded``);
    ``continuous``: the Gaussian density itself (a differential NLL, for continuous data).
    """
    if decoder == "continuous":
        return -mean_flat(gaussian_log_likelihood(x0, mean, log_var))
    if decoder == "discretized":
        lo, hi = (-1.0, 1.0) if bounded else (None, None)
        ll = discretized_gaussian_log_likelihood(x0, mean, log_var, bin_width=bin_width, low=lo, high=hi)
        return -mean_flat(ll).to(x0.dtype)
    raise ValueError(f"unknown decoder '{decoder}'; choose one of {', '.join(DECODERS)}")


def vlb_term(s: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor, mean: torch.Tensor,
             log_var: torch.Tensor, decoder: str = "discretized", bin_width: float = EIGHT_BIT,
             bounded: bool = True) -> torch.Tensor:
    """L_{t-1} for each example at its entry ``i`` (L_0 where i == 0), nats per dim: (B,).

    mean, log_var: those of p_theta(x_{t-1} | x_t), like x_t.
    """
    true_mean, _, true_log_var = q_posterior(s, x0, x_t, i)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))  # Ho et al. 2020, Eq. 5, L_{t-1}
    first = torch.as_tensor(i, device=kl.device).reshape(-1).expand(kl.shape[0]) == 0
    if not bool(first.any()):
        return kl
    nll = decoder_nll(x0, mean, log_var, decoder, bin_width, bounded)  # Eq. 5, L_0
    return torch.where(first, nll, kl)


def check_decoder_data(x0: torch.Tensor, decoder: str, bin_width: Optional[float], source: str = "data"):
    """(bin_width, bounded) for the decoder, or a DDPMError when the data do not fit it.

    The discretized decoder needs data on a grid: 8-bit images scaled to [-1, 1] are
    recognised; any other data need an explicit ``bin_width`` (or the continuous decoder).
    """
    if decoder == "continuous":
        return EIGHT_BIT, True
    if decoder != "discretized":
        raise DDPMError(f"unknown decoder '{decoder}'; choose one of {', '.join(DECODERS)}")
    if bin_width is not None:
        if not bin_width > 0:
            raise DDPMError(f"bin width must be > 0, got {bin_width}")
        # bounded edges only when the data fill a grid from -1 to 1 with this spacing
        lvl = (x0.double() + 1.0) / bin_width
        on_grid = bool((lvl - lvl.round()).abs().max() < 1e-3) and float(x0.min()) >= -1 and float(x0.max()) <= 1
        return float(bin_width), on_grid
    levels = (x0.double() + 1.0) * 127.5
    if float(x0.min()) >= -1 - 1e-6 and float(x0.max()) <= 1 + 1e-6 and bool((levels - levels.round()).abs().max() < 1e-3):
        return EIGHT_BIT, True
    raise DDPMError(f"{source} is not 8-bit data in [-1, 1], so the discretized decoder needs a bin width: "
                    "state it (--bin-width W, e.g. 0.125 for 17 grey levels) or use --decoder continuous")


def data_decoder(cfg) -> Tuple[str, Optional[float]]:
    """(decoder, bin width) that fit a config's data: 8-bit images (MNIST, image folders)
    bins of 2/255, the 17-level 8x8 digits bins of 2/16, 2D toy data a continuous decoder."""
    dataset = cfg.data.dataset
    if dataset == "toy":
        return "continuous", None
    if dataset == "digits":
        return "discretized", 2.0 / 16.0
    return "discretized", EIGHT_BIT
