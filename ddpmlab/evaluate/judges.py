"""Sample-quality measures that can say "bad": a digit judge with a reject class, clean backgrounds, grain.

FID and a classifier's confidence alone miss what a user sees at first glance: a classifier
trained on digits only must spread its softmax over the ten digits, so it is confident on pure
noise, and digits on a grey, grainy background still get their class. Three measures look at
that directly (docs/guides/evaluation.md):

* the **honest confident share** (:func:`honest_confident_share`): the fraction of images whose
  top class under the shipped digit judge is a digit (not its 11th class, "reject") with
  probability >= 0.8. The judge (``assets/mnist_judge.safetensors``, made by
  ``benchmarks/train_mnist_judge.py``) saw noise, blobs, smooth fields, digits on grey or grainy
  backgrounds, digits in heavy noise, two digits overlaid and scribbles as "reject". 1x28x28 only.
* the **clean-background share** (:func:`clean_share`): the fraction of images whose border (the
  outer :func:`border_width` pixels), per pixel the brightest channel on the [0, 1] scale, has a
  mean below 20/255. Any size, any number of channels; meaningful for data on black.
* the **rough share** (:func:`rough_share`): the fraction of images rougher (:func:`roughness`,
  the mean absolute difference of neighbouring pixels) than every image of a set of real ones:
  high-frequency grain, salt and pepper.

All functions take images in the data's scale, (N, C, H, W) in [-1, 1].  :func:`digit_quality` gives
all three for a set of digit samples as ``ddpm eval --metrics judge,clean,rough`` reports them; the
benchmarks score digits with it.

    >>> judge = load_digit_judge()                 # eval mode, frozen, 11 logits
    >>> honest_confident_share(x, judge)           # x: (N, 1, 28, 28)
    >>> clean_share(x), rough_share(x, real)
    >>> digit_quality(x, real)                     # {"judge", "judge_vs_real", "clean", "rough"}
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.classifier import IMAGE_SHAPE, MNISTClassifier, load_classifier

JUDGE_WEIGHTS = Path(__file__).parent / "assets" / "mnist_judge.safetensors"
REJECT = 10  # the judge's 11th class: "not a clean digit"
CONFIDENT = 0.8  # a judgement counts when the top class has at least this probability
CLEAN_LEVEL = 20 / 255  # a clean background's mean border brightness stays below this ([0, 1] scale)
ROUGH_REFERENCE_N = 500  # real images whose roughest one sets the rough level (the 500 MNIST test digits)


def load_digit_judge(device: Union[str, torch.device] = "cpu") -> MNISTClassifier:
    """The shipped digit judge (eval mode, frozen): ``judge(x) -> logits`` (B, 11), class 10 = reject.

    ``x``: (B, 1, 28, 28) in [-1, 1]. ``judge.metadata`` holds its held-out figures.
    """
    return _load_judge(str(torch.device(device)))


@lru_cache(maxsize=4)
def _load_judge(device: str) -> MNISTClassifier:
    return load_classifier(JUDGE_WEIGHTS, device)


def check_judge_shape(shape) -> None:
    """A DDPMError unless images of ``shape`` (C, H, W) are what the judge reads (1x28x28 digits)."""
    if tuple(shape) != IMAGE_SHAPE:
        raise DDPMError(f"the digit judge reads 1x28x28 digits, these images are {tuple(shape)}; use the "
                        "clean-background and rough shares for them")


@torch.no_grad()
def judge_probabilities(x: torch.Tensor, judge: Optional[MNISTClassifier] = None,
                        batch_size: int = 500) -> torch.Tensor:
    """x: (N, 1, 28, 28) in [-1, 1] -> softmax over the 10 digits and reject, (N, 11) float32 on the CPU."""
    check_judge_shape(x.shape[1:])
    judge = judge if judge is not None else load_digit_judge()
    device = next(judge.parameters()).device
    out = [judge(x[i:i + batch_size].to(device, torch.float32)).softmax(1).float().cpu()
           for i in range(0, len(x), batch_size)]
    if not out:
        raise DDPMError("no images to judge")
    return torch.cat(out)


def honest_confident(probs: torch.Tensor, level: float = CONFIDENT) -> torch.Tensor:
    """probs (N, 11) -> (N,) bool: the top class is a digit and its probability is at least ``level``."""
    p, top = probs.max(1)
    return (top != REJECT) & (p >= level)


def honest_confident_share(x: torch.Tensor, judge: Optional[MNISTClassifier] = None, level: float = CONFIDENT,
                           batch_size: int = 500) -> float:
    """The fraction of digits ``x`` (N, 1, 28, 28) the judge confidently calls a digit (p >= ``level``)."""
    return float(honest_confident(judge_probabilities(x, judge, batch_size), level).float().mean())


def border_width(height: int, width: int) -> int:
    """How many outer pixels count as the border: about 7 % of the shorter side, at least 1 (28x28: 2)."""
    return max(1, min(height, width) // 14)


def border_brightness(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) in [-1, 1] -> (N,): the mean over the border of each pixel's brightest channel, in [0, 1]."""
    if x.dim() != 4:
        raise DDPMError(f"border brightness needs images (N, C, H, W), got shape {tuple(x.shape)}")
    k = border_width(x.shape[-2], x.shape[-1])
    v = ((x.float().amax(1) + 1) / 2).clamp(0, 1)  # (N, H, W), the [0, 1] scale
    inner = torch.zeros(v.shape[-2:], dtype=torch.bool, device=v.device)
    inner[k:v.shape[-2] - k, k:v.shape[-1] - k] = True
    return v[:, ~inner].mean(1)


def clean_background(x: torch.Tensor, level: float = CLEAN_LEVEL) -> torch.Tensor:
    """(N,) bool: the image's border is darker than ``level`` on average (a clean black background)."""
    return border_brightness(x) < level


def clean_share(x: torch.Tensor, level: float = CLEAN_LEVEL) -> float:
    """The fraction of images ``x`` (N, C, H, W) in [-1, 1] with a clean background."""
    return float(clean_background(x, level).float().mean())


VISIBLE_GRAIN = 2 / 255  # grain fainter than this (on the [0, 1] scale) a person does not see


def roughness(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) in [-1, 1] -> (N,): the grain of each image, the median over its pixels and channels of
    |x - its 3x3 neighbourhood mean| on the [0, 1] scale.  The median looks at the flat parts (background,
    the inside of shapes), where grain shows, and not at the edges of strokes, which are few."""
    x = x.float()
    local = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x - local).abs().flatten(1).median(1).values / 2


def rough_level(real: torch.Tensor) -> float:
    """Above this roughness a sample is "rough": the roughest real image of ``real`` (N, C, H, W), and at least
    :data:`VISIBLE_GRAIN` (clean data such as MNIST has none at all)."""
    if len(real) == 0:
        raise DDPMError("the rough share needs real images to compare with, got none")
    return max(float(roughness(real).max()), VISIBLE_GRAIN)


def rough_share(x: torch.Tensor, real: Union[torch.Tensor, float]) -> float:
    """The fraction of images ``x`` rougher than every real image (``real``: the images, or their
    :func:`rough_level`), at the same size: grain and speckle that the data never has."""
    level = real if isinstance(real, float) else rough_level(real)
    return float((roughness(x) > level).float().mean())


def to_digit_size(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> (N, 1, 28, 28): digits of another size as the judge and the shipped classifier
    read them (bilinear, antialiased when shrinking, clamped); 28x28 digits unchanged."""
    if tuple(x.shape[-2:]) == IMAGE_SHAPE[1:]:
        return x
    x = F.interpolate(x, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False, antialias=x.shape[-1] > 28)
    return x.clamp(-1, 1)


def honest_scores(x: torch.Tensor, judge: MNISTClassifier, real_share: float,
                  batch_size: int = 500) -> Dict[str, float]:
    """``judge``: the honest confident share of digits ``x`` (N, 1, 28, 28); ``judge_vs_real``: its ratio to
    ``real_share``, the same share of real held-out digits (nan where that is 0)."""
    share = honest_confident_share(x, judge, batch_size=batch_size)
    return {"judge": share, "judge_vs_real": share / real_share if real_share else float("nan")}


def digit_quality(x: torch.Tensor, real: torch.Tensor, *, rough: Union[torch.Tensor, float, None] = None,
                  judge: Optional[MNISTClassifier] = None, batch_size: int = 500) -> Dict[str, float]:
    """The honest measures of digit samples as ``ddpm eval --metrics judge,clean,rough`` reports them.

    x: (N, 1, H, W) samples in the data's scale (clamped to [-1, 1] first, as a picture shows them);
    real: (M, 1, H, W) real held-out digits of the same size (``ddpm eval``: the 500 bundled MNIST test
    digits, ``load_mnist("test")[0]``).  Returns ``judge`` and ``judge_vs_real`` (:func:`honest_scores`
    against ``real``'s share), ``clean`` (:func:`clean_share`) and ``rough`` (:func:`rough_share`: rougher
    than every image of ``rough``, default ``real``, or than ``rough`` itself when it is a level).  The judge
    reads digits of another size at 28x28 (:func:`to_digit_size`); clean and rough read them as they are.
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise DDPMError(f"digit_quality scores 1-channel digits (N, 1, H, W), got shape {tuple(x.shape)}")
    if tuple(real.shape[1:]) != tuple(x.shape[1:]):
        raise DDPMError(f"digit_quality compares samples {tuple(x.shape[1:])} with real digits of the same size, "
                        f"got {tuple(real.shape[1:])}; resize the real digits to the samples' size first")
    x = x.clamp(-1, 1)
    judge = judge if judge is not None else load_digit_judge()
    real_share = honest_confident_share(to_digit_size(real), judge, batch_size=batch_size)
    return {**honest_scores(to_digit_size(x), judge, real_share, batch_size), "clean": clean_share(x),
            "rough": rough_share(x, real if rough is None else rough)}
