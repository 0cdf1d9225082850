"""Data with a closed-form diffusion: Gaussian mixtures and their exact denoisers and velocities.

For x_0 ~ sum_k w_k N(mu_k, s_k^2 I), the noised marginal is again a mixture,
q(x_t) = sum_k w_k N(sqrt(abar_t) mu_k, (abar_t s_k^2 + 1 - abar_t) I), so its score,
and with it the optimal noise predictor eps*(x_t, t) = -sqrt(1 - abar_t) grad log q(x_t),
are exact.  Under the flow x_t = (1 - t) x_0 + t eps (:mod:`ddpmlab.diffusion.flow`) it is
sum_k w_k N((1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I), and the optimal velocity E[eps - x_0 | x_t]
is exact too (:meth:`GaussianMixture.velocity`, :class:`ExactVelocity`).  Samplers driven by them
must reproduce the data distribution: the ground truth every sampler test and the sampler
benchmark measure against.
"""

from __future__ import annotations

from typing import Optional

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t


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
        a = abar.sqrt()
        # |x - a mu_k|^2 expanded, so that no (N, K, D) tensor is formed
        dist2 = (x64.pow(2).sum(1, keepdim=True) - 2 * a * (x64 @ means.T) + abar * means.pow(2).sum(1)[None])
        logn = -0.5 * (dist2.clamp_min(0) / var + self.dim * torch.log(var)) + w.log()[None]
        r = torch.softmax(logn, dim=1) / var  # posterior over components / its variance, (N, K)
        # -sum_k resp_k (x - a mu_k) / var_k
        return -(r.sum(1, keepdim=True) * x64 - a * (r @ means))


    def velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        """The exact velocity E[eps - x_0 | x_t = x] of the flow x_t = (1 - t) x_0 + t eps: x (N, D) flow
        coordinates, t (N,) or a scalar in [0, 1] -> (N, D) float64.

        Component k alone is Gaussian: with c = 1 - t and var_k = c^2 s_k^2 + t^2,
        E[eps | x, k] = t (x - c mu_k) / var_k and E[x_0 | x, k] = mu_k + c s_k^2 (x - c mu_k) / var_k, so
        v_k(x) = (t - c s_k^2) / var_k (x - c mu_k) - mu_k; the mixture weighs them by the posterior of k.
        """
        x64 = x.to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, 1)
        means, stds, w = (self.means.to(x.device), self.stds.to(x.device), self.weights.to(x.device))
        c = 1 - t
        var = c**2 * stds[None] ** 2 + t**2  # (N, K)
        dist2 = x64.pow(2).sum(1, keepdim=True) - 2 * c * (x64 @ means.T) + c**2 * means.pow(2).sum(1)[None]
        r = torch.softmax(-0.5 * (dist2.clamp_min(0) / var + self.dim * torch.log(var)) + w.log()[None], dim=1)
        gain = (t - c * stds[None] ** 2) / var  # (N, K)
        # sum_k r_k (gain_k (x - c mu_k) - mu_k)
        return (r * gain).sum(1, keepdim=True) * x64 - (r * (1 + c * gain)) @ means


class ExactVelocity(torch.nn.Module):
    """The exact velocity of a :class:`GaussianMixture` as a flow network (diffusion.prediction velocity):
    ``model(x, t * T, y=None) -> v``, x the flow coordinates (B, D) or (B, C, H, W) (flattened to D).

    ``y = k`` gives component k alone, ``y = K`` (the "no label" index) or ``y=None`` the whole mixture:
    the two models classifier-free guidance combines.
    """

    def __init__(self, mixture: GaussianMixture, T: int = 1000):
        super().__init__()
        self.mixture, self.T = mixture, T
        self.num_classes = mixture.means.shape[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(torch.float64) / self.T
        flat = x.reshape(b, -1)
        v = self.mixture.velocity(flat, t)
        if y is not None:
            y = torch.as_tensor(y, device=x.device).long().reshape(-1).expand(b)
            k = y.clamp(max=self.num_classes - 1)
            mu, s2 = self.mixture.means.to(x.device)[k], self.mixture.stds.to(x.device)[k, None] ** 2
            c = 1 - t[:, None]
            v_k = (t[:, None] - c * s2) / (c**2 * s2 + t[:, None] ** 2) * (flat.to(torch.float64) - c * mu) - mu
            v = torch.where((y < self.num_classes)[:, None], v_k, v)
        return v.to(x.dtype).reshape(x.shape)


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
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0]).cpu()
        # fractional t (continuous-time solvers): abar by log-sigma interpolation, as ModelPredictor
        abar = abar_of_t(self.schedule, t) if t.is_floating_point() else self.schedule.alphas_cumprod[t.long()]
        abar = abar.to(x_t.device)
        flat = x_t.reshape(x_t.shape[0], -1)
        eps = -(1 - abar)[:, None].sqrt() * self.mixture.score(flat, abar)
        return eps.to(x_t.dtype).reshape(x_t.shape)


class Gaussian:
    """One Gaussian N(mean, cov) in ``dim`` dimensions with a full covariance (float64).

    Its noised marginal is q(x_t) = N(sqrt(abar) mu, abar Sigma + (1 - abar) I), so score and
    eps* are exact; conditionals of some coordinates given the others are closed-form too
    (the ground truth for inpainting).  Duck-types the :class:`GaussianMixture` interface
    (``dim``, ``mean``, ``covariance``, ``sample``, ``score``) so :class:`ExactDenoiser` takes it.
    """

    def __init__(self, mean, cov):
        self.mu = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        if self.cov.shape != (self.dim, self.dim):
            raise ValueError(f"cov must be ({self.dim}, {self.dim}), got {tuple(self.cov.shape)}")
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.cov)  # Sigma = U diag(l) U^T
        if self.eigvals.min() <= 0:
            raise ValueError("cov must be positive definite")

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def mean(self) -> torch.Tensor:
        return self.mu.clone()

    def covariance(self) -> torch.Tensor:
        return self.cov.clone()

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.mu + (z * self.eigvals.sqrt()) @ self.eigvecs.T

    def score(self, x: torch.Tensor, abar) -> torch.Tensor:
        """grad log q(x_t) = -(abar Sigma + (1 - abar) I)^-1 (x - sqrt(abar) mu); x: (N, D), abar: (N,) or scalar."""
        dev = x.device
        abar = torch.as_tensor(abar, dtype=torch.float64, device=dev).reshape(-1, 1)
        u, lam = self.eigvecs.to(dev), self.eigvals.to(dev)
        diff = x.to(torch.float64) - abar.sqrt() * self.mu.to(dev)
        return -((diff @ u) / (abar * lam + 1 - abar)) @ u.T

    def conditional(self, known: torch.Tensor, values: torch.Tensor):
        """Mean (D_u,) and covariance (D_u, D_u) of the unknown coordinates given x[known] = values.

        known: (D,) bool; values: (D_k,).  The Schur complement of the Gaussian.
        """
        k, u = known, ~known
        s_uk = self.cov[u][:, k]
        gain = s_uk @ torch.linalg.inv(self.cov[k][:, k])
        mean = self.mu[u] + gain @ (values.to(torch.float64) - self.mu[k])
        return mean, self.cov[u][:, u] - gain @ s_uk.T


class ClassConditionalDenoiser(torch.nn.Module):
    """Exact eps* of a :class:`GaussianMixture` whose components are the classes.

    ``y = k`` gives the noise predictor of component k alone, ``y = K`` (the "no label" index,
    as in the UNet/MLP) or ``y=None`` that of the whole mixture: the two models classifier-free
    guidance combines.  x_t: (B, D), t: (B,) or scalar, y: (B,) -> (B, D).
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.means.shape[0]
        self.unconditional = ExactDenoiser(mixture, schedule)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        eps = self.unconditional(x_t, t)
        if y is None:
            return eps
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0]).cpu()
        abar = abar_of_t(self.schedule, t) if t.is_floating_point() else self.schedule.alphas_cumprod[t.long()]
        abar = abar.to(x_t.device)[:, None]
        y = torch.as_tensor(y, device=x_t.device).long()
        has = y < self.num_classes
        k = y.clamp(max=self.num_classes - 1)
        mu, s2 = self.mixture.means.to(x_t.device)[k], self.mixture.stds.to(x_t.device)[k, None] ** 2
        # component k alone: eps* = sqrt(1 - abar) (x_t - sqrt(abar) mu_k) / (abar s_k^2 + 1 - abar)
        eps_k = (1 - abar).sqrt() * (x_t.to(torch.float64) - abar.sqrt() * mu) / (abar * s2 + 1 - abar)
        return torch.where(has[:, None], eps_k.to(x_t.dtype), eps)
