"""Classifier-free guidance (Ho & Salimans 2022): label dropout in training, guidance in sampling.

Training (their Algorithm 1): with probability ``p_uncond`` a label is replaced by the
"no label" index ``num_classes`` (the UNet/MLP reserve that row of their class
embedding), so one network learns both eps(x_t, t, y) and eps(x_t, t, none).

Sampling (their Eq. 6): the guided prediction is

    out = uncond + scale * (cond - uncond),

scale 1 being plain conditional sampling, 0 unconditional sampling and > 1 a push
towards the class (their w = scale - 1).  :func:`guided` wraps the network, so every
sampler gets guidance through the unchanged :class:`~ddpmlab.samplers.base.ModelPredictor`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ddpmlab.errors import OPTION, DDPMError, OptionError


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: Optional[torch.Generator] = None,
                u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (B,) with each label replaced by ``null_label`` with probability p (Ho & Salimans 2022, Alg. 1):
    where ``u`` (B,) (uniform draws, default drawn here from ``generator``) is below p."""
    if p <= 0:
        return y
    if u is None:
        u = torch.rand(y.shape, generator=generator, device=y.device if generator is None else generator.device)
    return torch.where(u.to(y.device) < p, torch.full_like(y, null_label), y)


def num_classes_of(model) -> int:
    """The number of classes of a conditional denoiser (its ``num_classes``), 0 when unconditional."""
    return int(getattr(model, "num_classes", None) or 0)


class ClassifierFreeGuidance(nn.Module):
    """A denoiser ``forward(x_t, t, y=None)`` returning uncond + scale * (cond - uncond).

    ``y`` (B,) comes from the call or, when the call passes none, from the wrapper.  Both
    passes run as one batch of 2B through ``model``.  Outputs with more channels than x
    (a learned variance in the extra channels) are guided in the first C channels only and
    keep the conditional variance, as GLIDE does.  scale 1 and 0 run one pass only, so they
    are exactly conditional and unconditional sampling.
    """

    def __init__(self, model: nn.Module, y: Optional[torch.Tensor] = None, scale: float = 1.0):
        super().__init__()
        self.num_classes = num_classes_of(model)
        if not self.num_classes:
            raise DDPMError("classifier-free guidance needs a class-conditional model (trained with "
                            "model.num_classes); this model is unconditional")
        if scale < 0:
            raise OptionError("guidance", f"{OPTION} must be >= 0 (1: conditional, 0: unconditional), got {scale}")
        self.model = model
        self.scale = float(scale)
        self.y = y

    def forward(self, x_t: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t: (B, ...), t: (B,) or scalar, y: (B,) class indices -> the guided output (B, ...)."""
        y = self.y if y is None else y
        if y is None:
            raise DDPMError("classifier-free guidance needs class labels y: give them to the call or the wrapper")
        b = x_t.shape[0]
        y = torch.as_tensor(y, device=x_t.device).long().reshape(-1).expand(b)
        null = torch.full_like(y, self.num_classes)
        if self.scale == 1.0:
            return self.model(x_t, t, y)
        if self.scale == 0.0:
            return self.model(x_t, t, null)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:b], out[b:]
        c = x_t.shape[1]
        if out.shape[1] == c:
            # Ho & Salimans 2022, Eq. 6 with w = scale - 1
            return uncond + self.scale * (cond - uncond)
        guided = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)


def guided(model: nn.Module, y: Optional[torch.Tensor] = None, scale: float = 1.0) -> ClassifierFreeGuidance:
    """``model`` wrapped with classifier-free guidance of strength ``scale`` towards labels ``y``."""
    return ClassifierFreeGuidance(model, y, scale)


def check_labels(model, labels: torch.Tensor) -> None:
    """An OptionError about 'class' unless every label lies in [0, num_classes)."""
    k = num_classes_of(model)
    if not k:
        raise OptionError("class", f"{OPTION} needs a class-conditional model (trained with model.num_classes); "
                                   "this run is unconditional")
    bad = labels[(labels < 0) | (labels >= k)]
    if len(bad):
        raise OptionError("class", f"{OPTION} {int(bad[0])} is out of range: this model knows classes 0..{k - 1}")


def conditioning(model: nn.Module, n: int, label: Optional[int] = None, guidance: Optional[float] = None,
                 label_dropout: Optional[float] = None):
    """(model, labels) for sampling ``n`` images of class ``label`` with guidance ``guidance``.

    No label and no guidance: the model unchanged and labels None (unconditional, or the "no
    label" row of a conditional model).  A label alone: conditional sampling.  Guidance
    without a label: labels cycle through all classes (0, 1, ..., K-1, 0, ...).
    ``label_dropout`` is the training value from the run's config: 0 means the model never
    saw the "no label" row, so a guidance scale other than 1 is refused.  Bad values are
    OptionErrors about 'class' or 'guidance'.
    """
    if label is None and guidance is None:
        return model, None
    k = num_classes_of(model)
    if guidance is not None and not k:
        raise OptionError("guidance", f"{OPTION} needs a class-conditional model (trained with "
                                      "model.num_classes); this run is unconditional")
    labels = torch.full((n,), label, dtype=torch.long) if label is not None else torch.arange(n) % k
    check_labels(model, labels)
    if guidance is None:
        return model, labels
    if guidance != 1.0 and label_dropout is not None and label_dropout <= 0:
        raise OptionError("guidance", f"{OPTION} needs a model trained with label dropout (train.label_dropout > "
                                      f"0): this run never learned the unconditional case; use {OPTION} 1 or retrain")
    return guided(model, scale=guidance), labels
