"""Classifier-free guidance (Ho & Salimans 2022): label dropout in training, guidance in sampling.

Training (their Algorithm 1): with probability ``p_uncond`` a label is replaced by the
"no label" index ``num_classes`` (the UNet/MLP reserve that row of their class
embedding), so one network learns both eps(x_t, t, y) and eps(x_t, t, none).

Sampling (their Eq. 6): the guided prediction is

    out = uncond + scale * (cond - uncond),

scale 1 being plain conditional sampling, 0 unconditional sampling and > 1 a push
towards the class (their w = scale - 1).  :func:`guided` wraps the network, so every
sampler gets guidance through the unchanged :class:`~ddpmlab.samplers.base.ModelPredictor`.

Text (GLIDE, Nichol et al. 2022, Sec. 3.2): caption dropout trains the empty prompt as the
unconditional model, and :class:`TextGuidance` takes the same Eq. 6 with the prompts' output as
``cond`` and the empty prompt's (or a negative prompt's) as ``uncond``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ddpmlab.errors import OPTION, DDPMError, OptionError
from ddpmlab.models.text_condition import TextCondition, cat_text


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
        return combine(out[:b], out[b:], x_t.shape[1], self.scale)


def combine(cond: torch.Tensor, uncond: torch.Tensor, channels: int, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond) (Ho & Salimans 2022, Eq. 6 with w = scale - 1) in the first ``channels``
    channels; further channels (a learned variance) are the conditional output's, as GLIDE keeps them."""
    if cond.shape[1] == channels:
        return uncond + scale * (cond - uncond)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def _same(a: TextCondition, b: TextCondition) -> bool:
    """Whether two text conditions are equal (tokens, mask and pooled embedding)."""
    def eq(u, v):
        return (u is None and v is None) or (u is not None and v is not None and u.shape == v.shape
                                             and torch.equal(u, v))
    return eq(a.tokens, b.tokens) and eq(a.full_mask(), b.full_mask()) and eq(a.pooled, b.pooled)


class TextGuidance(nn.Module):
    """Classifier-free guidance on text: a denoiser ``forward(x_t, t, y=None)`` returning
    uncond + scale * (cond - uncond), ``cond`` the output for the prompts' TextCondition, ``uncond`` for the
    unconditional (empty) or negative prompt's (GLIDE, Nichol et al. 2022, Sec. 3.2; Ho & Salimans 2022, Eq. 6).

    ``model(x, t, y, cond=TextCondition)``: a text-to-image denoiser; ``cond``, ``uncond``: TextConditions of
    n rows, row i of a batch reading row ``i mod n`` (a batch of k * n rows sees them repeated).  Class labels
    ``y`` stay in both passes (the guidance is the text's).  Both passes run as one batch of 2B (:func:`cat_text`
    pads the shorter token sequence with masked tokens).  Scale 1, and an unconditional prompt equal to the
    prompt (cond - uncond = 0), run one pass: exactly the conditional model; scale 0 the unconditional one.
    """

    def __init__(self, model: nn.Module, cond: TextCondition, uncond: TextCondition, scale: float = 1.0):
        super().__init__()
        if scale < 0:
            raise OptionError("guidance", f"{OPTION} must be >= 0 (1: conditional, 0: unconditional), got {scale}")
        if len(cond) != len(uncond):
            raise ValueError(f"{len(cond)} prompts but {len(uncond)} unconditional prompts")
        self.model, self.scale = model, float(scale)
        self.cond, self.uncond = cond, uncond  # plain attributes: never in a state dict
        self.one_pass = self.scale == 1.0 or _same(cond, uncond)
        self.num_classes = getattr(model, "num_classes", None)

    @staticmethod
    def _rows(c: TextCondition, b: int, device) -> TextCondition:
        c = c.to(device)
        return c if len(c) == b else c[torch.arange(b, device=device) % len(c)]

    def forward(self, x_t: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t: (B, ...), t: (B,) or scalar, y: (B,) or None -> the guided output (B, ...)."""
        b = x_t.shape[0]
        cond, uncond = self._rows(self.cond, b, x_t.device), self._rows(self.uncond, b, x_t.device)
        if self.one_pass:
            return self.model(x_t, t, y, cond=cond)
        if self.scale == 0.0:
            return self.model(x_t, t, y, cond=uncond)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)
        y2 = None if y is None else torch.cat([y, y])
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), y2, cond=cat_text([cond, uncond]))
        return combine(out[:b], out[b:], x_t.shape[1], self.scale)


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
