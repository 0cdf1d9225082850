"""A text-to-image denoiser: the denoiser and its text encoder as one module, :class:`TextToImage`.

GLIDE trains its text transformer with the denoiser (Nichol et al. 2022, Sec. 4); Stable Diffusion reads a
frozen CLIP text encoder (Rombach et al. 2022, Sec. 3.3).  A text run's trained module is a TextToImage either
way:

* ``forward(x_t, t, y=None, cond=...)`` calls the denoiser (a UNet with ``unet.context_dim`` or PixArt-alpha's
  DiT with ``dit.context_dim``) with ``cond`` a :class:`~ddpmlab.models.text_condition.TextCondition` (prompts
  encoded already: sampling, a frozen encoder's cached caption embeddings) or :class:`PromptTokens` (token ids
  and their mask, encoded here, inside the forward pass, so that the own encoder learns from the denoiser's
  loss, micro-batch by micro-batch); class labels ``y`` go to the denoiser beside the text;
* ``encode(prompts) -> TextCondition`` and ``tokenize(prompts) -> PromptTokens`` read prompts as the encoder
  does (a prompt over ``text.max_length`` tokens is truncated with a one-line warning);
* its state dict holds the denoiser under ``denoiser.`` and an own encoder under ``text_encoder.``: optimised,
  averaged by the EMA and checkpointed with the denoiser.  A frozen encoder is no part of it (not a registered
  sub-module): it is read from ``text.encoder``'s folder, moved with the module and shared by its EMA copy.

A denoiser without a pooled-embedding input (``pooled_dim`` null) gets the encoder's tokens and mask only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ddpmlab.config import Config
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.models.build import build_model
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_encoder import TextEncoder


@dataclass(frozen=True)
class PromptTokens:
    """Prompts as token ids (B, L) int64 and their mask (B, L) bool (True on real tokens), not yet encoded;
    a batch of B rows as a TextCondition is (``len``, ``[rows]``, ``to``, ``chunk``)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> "PromptTokens":
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return PromptTokens(self.ids[rows], self.mask[rows])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptTokens":
        """On ``device`` (ids and mask keep their dtypes)."""
        return PromptTokens(self.ids.to(device), self.mask.to(device))

    def chunk(self, k: int) -> list:
        """Split into the row chunks ``torch.chunk`` makes of a (B, ...) tensor."""
        return [self[rows] for rows in torch.arange(len(self)).chunk(k)]


class _Shared:
    """Holds an object that every copy of its module shares: ``copy.deepcopy`` returns the holder itself."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo) -> "_Shared":
        return self


def text_section(cfg: Config) -> str:
    """The config section of the denoiser that reads the text: 'unet' or 'dit'."""
    return "dit" if cfg.model.kind == "dit" else "unet"


def check_text_widths(cfg: Config, width: int, pooled_width: Optional[int], source: str) -> None:
    """ConfigError unless the denoiser of ``cfg`` reads tokens ``width`` wide (its ``context_dim``) and a pooled
    embedding of ``pooled_width`` where its ``pooled_dim`` is set; ``source`` names the encoder."""
    section = text_section(cfg)
    context_dim, pooled_dim = getattr(cfg, section).context_dim, getattr(cfg, section).pooled_dim
    if context_dim is None:
        raise ConfigError(f"text.encoder={cfg.text.encoder} but the {section} has no cross-attention "
                          f"({section}.context_dim is null); set {section}.context_dim={width}")
    if context_dim != width:
        raise ConfigError(f"{section}.context_dim={context_dim} but {source} gives tokens {width} wide; set "
                          f"{section}.context_dim={width}")
    if pooled_dim is not None and pooled_width is None:
        raise ConfigError(f"{section}.pooled_dim={pooled_dim} but {source} has no pooled embedding; set "
                          f"{section}.pooled_dim=null")
    if pooled_dim is not None and pooled_dim != pooled_width:
        raise ConfigError(f"{section}.pooled_dim={pooled_dim} but {source}'s pooled embedding is {pooled_width} "
                          f"wide; set {section}.pooled_dim={pooled_width} (or null: tokens only)")


class TextToImage(nn.Module):
    """A text-conditioned denoiser with its text encoder (module docstring)."""

    def __init__(self, denoiser: nn.Module, encoder: TextEncoder):
        super().__init__()
        self.denoiser = denoiser
        inner = getattr(denoiser, "net", denoiser)  # EDM's preconditioning keeps the network in .net
        self.context_dim = getattr(inner, "context_dim", None)
        self.pooled_dim = getattr(inner, "pooled_dim", None)
        self.num_classes = getattr(denoiser, "num_classes", None)  # read by classifier-free guidance
        if self.context_dim != encoder.width:
            raise ConfigError(f"the denoiser reads text tokens {self.context_dim} wide (context_dim) but the text "
                              f"encoder gives {encoder.width}")
        if encoder.trainable:
            self.text_encoder = encoder
            self._frozen: Optional[_Shared] = None
        else:
            self._frozen = _Shared(encoder)

    @property
    def encoder(self) -> TextEncoder:
        return self.text_encoder if self._frozen is None else self._frozen.obj

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._frozen is not None:  # a frozen encoder moves with the module (it is not a sub-module)
            self._frozen.obj._apply(fn, *args, **kwargs)
        return self

    def tokenize(self, prompts: Sequence[str]) -> PromptTokens:
        """``prompts`` (B strings) as token ids and mask (B, max_length), on the CPU."""
        if isinstance(prompts, str):
            raise TypeError("tokenize takes a list of prompts, not one string; wrap it: tokenize([prompt])")
        return PromptTokens(*self.encoder.tokenize(list(prompts)))

    def fit(self, cond: TextCondition) -> TextCondition:
        """``cond`` as the denoiser reads it: the pooled embedding dropped where it takes none."""
        if self.pooled_dim is None and cond.pooled is not None:
            return TextCondition(cond.tokens, cond.mask)
        return cond

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """``prompts`` (B strings) encoded on the module's device: tokens (B, L, D), mask (B, L), pooled."""
        return self.fit(self.encoder.encode(prompts))

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None, cond=None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) or scalar, y: (B,) labels or None, cond: a TextCondition or PromptTokens
        of B rows -> the denoiser's output."""
        if cond is None:
            raise DDPMError("this is a text-to-image denoiser: give it cond=model.encode(prompts) (on the command "
                            "line: --prompt \"...\"; the empty prompt \"\" is the unconditional model)")
        if isinstance(cond, PromptTokens):  # encoded here: the own encoder trains with the denoiser
            cond = self.encoder(cond.ids.to(x.device), cond.mask.to(x.device))
        return self.denoiser(x, t, y, cond=self.fit(cond))


def build_text_to_image(cfg: Config, encoder: TextEncoder) -> TextToImage:
    """The denoiser of ``cfg`` (:func:`~ddpmlab.models.build.build_model`) reading ``encoder``'s text, checked
    against it (ConfigError naming the key to set)."""
    check_text_widths(cfg, encoder.width, encoder.pooled_width, f"the text encoder {cfg.text.encoder}")
    return TextToImage(build_model(cfg), encoder)
