"""Distances between 2-D point sets for toy runs: sliced Wasserstein distance and MMD."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ddpmlab.errors import DDPMError


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256,
                       generator: Optional[torch.Generator] = None) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011) between point sets x (N, D) and y (M, D).

    SW_2^2 = E_theta W_2^2(theta.x, theta.y) over random unit directions theta; each 1-D W_2
    compares sorted projections (quantiles on a common grid when N != M).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DDPMError(f"sliced Wasserstein needs two (N, D) point sets with the same D, got "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (x @ theta).T.contiguous().sort(1).values  # (P, N): sorted projections (row sort: fast)
    py = (y @ theta).T.contiguous().sort(1).values  # (P, M)
    if px.shape[1] != py.shape[1]:
        k = max(px.shape[1], py.shape[1])
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        px, py = torch.quantile(px, q, dim=1).T, torch.quantile(py, q, dim=1).T
    return float((px - py).pow(2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) with a sum of Gaussian kernels.

    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)); diagonal terms are left out of the
    within-set means, so the estimate has expectation 0 when x and y share a distribution.
    """
    if len(x) < 2 or len(y) < 2:
        raise DDPMError(f"MMD needs at least 2 points per set, got {len(x)} and {len(y)}")
    x, y = x.double(), y.double()

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())
