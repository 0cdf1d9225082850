"""2-D toy distributions for the MLP denoiser.

Every set is standardised with FIXED constants (a centre and one scale per dataset,
measured once on a large sample), never with statistics of the sample at hand: a
fresh sample, or one drawn with another seed, lies on the same scale.  One scale for
both axes keeps the shapes' aspect ratio; each axis ends up with a std between about
0.7 and 1.3.  ``noise`` is added in each generator's native units, before scaling.
"""

from __future__ import annotations

import numpy as np
import torch

from ddpmlab.errors import DataError

# name -> (centre of the native data, scale to divide by)
_STANDARDISE = {
    "swiss_roll": ((2.0, 0.2), 6.8),  # native std ~(6.6, 6.9)
    "moons": ((0.5, 0.25), 0.7),  # native std ~(0.87, 0.49)
    "s_curve": ((0.0, 0.0), 1.0),  # native std ~(0.71, 1.39)
    "ring": ((0.0, 0.0), 1.42),  # radius 2: native std ~1.42 per axis
}
TOY_NAMES = tuple(_STANDARDISE)

RING_MODES = 8
RING_RADIUS = 2.0
RING_STD = 0.1


def _ring(n: int, noise: float, rng: np.random.RandomState) -> np.ndarray:
    k = rng.randint(0, RING_MODES, size=n)
    angle = 2.0 * np.pi * k / RING_MODES
    centres = RING_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    std = float(np.hypot(RING_STD, noise))
    return centres + std * rng.randn(n, 2)


def make_toy(name: str, n: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``n`` samples of the 2-D toy set ``name`` as a float32 tensor ``(n, 2)``.

    ``name``: swiss_roll | moons | s_curve | ring (8 Gaussians on a circle).
    """
    from sklearn.datasets import make_moons, make_s_curve, make_swiss_roll

    if name not in _STANDARDISE:
        raise DataError(f"data.toy: unknown toy dataset '{name}'; choose one of {', '.join(TOY_NAMES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise DataError(f"data.toy_samples: need a positive number of samples, got {n!r}")
    if noise < 0:
        raise DataError(f"data.toy_noise: must be >= 0, got {noise}")
    n = int(n)
    seed = int(seed) % (2**32)
    if name == "swiss_roll":
        x, _ = make_swiss_roll(n, noise=noise, random_state=seed)
        x = x[:, [0, 2]]
    elif name == "s_curve":
        x, _ = make_s_curve(n, noise=noise, random_state=seed)
        x = x[:, [0, 2]]
    elif name == "moons":
        x, _ = make_moons(n, noise=noise, random_state=seed)
    else:
        x = _ring(n, noise, np.random.RandomState(seed))
    centre, scale = _STANDARDISE[name]
    x = (np.asarray(x, dtype=np.float64) - np.asarray(centre)) / scale
    return torch.from_numpy(x).float()
