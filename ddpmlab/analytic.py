"""Data with a closed-form diffusion: Gaussian mixtures and their exact denoisers.

For x_0 ~ sum_k w_k N(mu_k, s_k^2 I), the noised marginal is again a mixture,
q(x_t) = sum_k w_k N(sqrt(abar_t) mu_k, (abar_t s_k^2 + 1 - abar_t) I), so its score,
and with it the optimal noise predictor eps*(x_t, t) = -sqrt(1 - abar_t) grad log q(x_t),
are exact.  Samplers driven by eps* must reproduce the data distribution: the ground
truth every sampler test and the sampler benchmark measure against.
"""

from __future__ import annotations

from typing import Optional

import torch

from .schedules import NoiseSchedule


class GaussianMixture:
    """Isotropic Gaussian mixture in ``dim`` dimensions (float64).

    means: (K, D), stds: (K,), weights: (K,) (normalised here).
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim == 1:
            self.means = self.means[None]
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.1, dim: int = 2) -> "GaussianMixture":
        """k components on a circle in the first two coordinates (the rest zero)."""
        ang = torch.arange(k, dtype=torch.float64) * 2 * torch.pi / k
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * ang.cos(), radius * ang.sin()
        return cls(means, std)

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        d = self.dim
        cov = torch.zeros(d, d, dtype=torch.float64)
        for w, m, s in zip(self.weights, self.means, self.stds):
            diff = (m - mu)[:, None]
            cov += w * (s**2 * torch.eye(d, dtype=torch.float64) + diff @ diff.T)
        return cov

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp, None] * z

    def log_prob(self, x: torch.Tensor, abar: float | torch.Tensor = 1.0) -> torch.Tensor:
        """log q(x_t) for noise level abar (1.0: the data density); x: (N, D) -> (N,)."""
        x = x.to(torch.float64)
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)
        var = abar * self.stds[None] ** 2 + (1 - abar)  # (N or 1, K)
        diff = x[:, None, :] - abar.sqrt()[..., None] * self.means[None]  # (N, K, D)
        d = self.dim
        logn = -0.5 * (diff.pow(2).sum(-1) / var + d * torch.log(2 * torch.pi * var))
        return torch.logsumexp(logn + self.weights.log()[None], dim=1)

    def score(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """grad_x log q(x_t) for per-example noise levels abar (N,) or scalar; x: (N, D)."""
        x64 = x.to(torch.float64)
        abar = torch.as_tensor(abar, dtype=torch.float64, device=x.device).reshape(-1, 1)
        means, stds, w = (self.means.to(x.device), self.stds.to(x.device), self.weights.to(x.device))
        var = abar * stds[None] ** 2 + (1 - abar)  # (N, K)
        diff = x64[:, None, :] - abar.sqrt()[..., None] * means[None]  # (N, K, D)
        logn = -0.5 * (diff.pow(2).sum(-1) / var + self.dim * torch.log(var)) + w.log()[None]
        resp = torch.softmax(logn, dim=1)  # posterior over components
        return -(resp[..., None] * diff / var[..., None]).sum(1)


class ExactDenoiser(torch.nn.Module):
    """The optimal eps-predictor of a :class:`GaussianMixture` under ``schedule``.

    Follows the denoiser interface ``model(x_t, t, y=None) -> eps`` with integer t;
    inputs (B, D) or (B, C, H, W) (flattened to D = C*H*W).
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x_t.shape[0]).cpu()
        abar = self.schedule.alphas_cumprod[t].to(x_t.device)
        flat = x_t.reshape(x_t.shape[0], -1)
        eps = -(1 - abar)[:, None].sqrt() * self.mixture.score(flat, abar)
        return eps.to(x_t.dtype).reshape(x_t.shape)
