"""Sample-quality metrics on feature sets: FID, KID and IS by torchmetrics; precision/recall.

Everything here works on features already extracted (see :mod:`.features`), so the
extractor runs once per image whatever the number of metrics.  torchmetrics' metrics
are given an identity "network" and fed the features; FID statistics are float64
sums over *all* samples (torchmetrics' own state), never one batch.
"""

from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch
from torch import nn

from ddpmlab.errors import OPTION, DDPMError, OptionError


class _Identity(nn.Module):
    """Features in, features out: lets torchmetrics consume precomputed features (B, D)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f


def feature_sums(features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The sufficient statistics of FID: sum (D,), sum of outer products (D, D), n (float64)."""
    f = features.double()
    return {"sum": f.sum(0), "cov_sum": f.T @ f, "n": torch.tensor(float(len(f)), dtype=torch.float64)}


def check_fid_samples(n: int, num_features: int, what: str = "samples") -> None:
    """An OptionError about 'n' unless ``n`` ``what`` are enough for FID with ``num_features`` features."""
    # the sample covariance of n points has rank <= n - 1: it needs n > D to be full rank
    if n <= num_features:
        raise OptionError("n", f"FID with {num_features}-dimensional features needs more than {num_features} {what} "
                               f"(got {n}; the covariance would be singular): set {OPTION} to "
                               f"{max(1000, num_features + 1)} or more")


def fid(real: Dict[str, torch.Tensor], fake_features: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6).

    d^2 = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), via torchmetrics.
    ``real``: :func:`feature_sums` of the reference (possibly from the cache);
    ``fake_features``: (N, D).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = fake_features.shape[1]
    check_fid_samples(len(fake_features), d)
    if int(real["n"]) <= d:  # a reference too small for its covariance: more data is the fix, not more samples
        raise DDPMError(f"FID with {d}-dimensional features needs more than {d} reference images (got "
                        f"{int(real['n'])}; the covariance would be singular); use a larger data set")
    metric = FrechetInceptionDistance(feature=_Identity(d), reset_real_features=False)
    metric.real_features_sum = real["sum"].double().clone()
    metric.real_features_cov_sum = real["cov_sum"].double().clone()
    metric.real_features_num_samples = torch.tensor(int(real["n"]))
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def kid(real_features: torch.Tensor, fake_features: torch.Tensor, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel.

    Mean and standard deviation over ``subsets`` random subsets of ``subset_size`` (capped at
    the smaller set); torchmetrics draws the subsets, seeded here for reproducibility.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    m = min(subset_size, len(real_features), len(fake_features))
    if m < 2:
        raise DDPMError(f"KID needs at least 2 samples in each set, got {len(fake_features)}; draw more samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in a buffer": we know
        metric = KernelInceptionDistance(feature=_Identity(fake_features.shape[1]), subsets=subsets, subset_size=m)
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> Tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean and std over splits."""
    from torchmetrics.image.inception import InceptionScore

    if len(logits) < 2 * splits:
        raise DDPMError(f"the Inception Score needs at least {2 * splits} samples ({splits} splits), "
                        f"got {len(logits)}; draw more samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "saves all features in a buffer": we know
        metric = InceptionScore(feature=_Identity(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row: (N,)."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the point itself is at distance 0
    return torch.cat(out)


def _inside_manifold(points: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 2048) -> torch.Tensor:
    """For each point, whether it lies within radii[j] of some support[j]: (N,) bool."""
    out = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], support)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-3).

    Each set's manifold is the union of balls around its points with radius the distance to
    the k-th nearest neighbour; precision is the fraction of generated points inside the real
    manifold, recall the fraction of real points inside the generated one.
    """
    if min(len(real_features), len(fake_features)) <= k:
        raise DDPMError(f"precision/recall with k={k} needs more than {k} samples per set; draw more samples")
    real, fake = real_features.double(), fake_features.double()
    precision = _inside_manifold(fake, real, _kth_neighbour_radius(real, k)).double().mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_radius(fake, k)).double().mean()
    return float(precision), float(recall)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples that the classifier assigns to the class they were generated for."""
    return float((logits.argmax(1) == labels.to(logits.device)).double().mean())
