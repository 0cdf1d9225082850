"""What a text-conditioned denoiser reads beside x_t and t: :class:`TextCondition`.

A text encoder turns B prompts into token embeddings (B, L, D) with a padding mask (B, L),
and optionally one pooled embedding per prompt (B, P) (CLIP's projected end-of-text token,
as SDXL adds to the time embedding).  The denoiser takes them as ``model(x_t, t, y, cond=TextCondition)``.

A TextCondition behaves as a batch of B rows, as a conditioning image (B, C, H, W) does, so it
flows unchanged through what splits or selects rows of a condition: ``len(c)``, ``c[rows]``,
``c.to(device)``, ``c.chunk(k)`` (training's micro-batches), ``c.expand(n)`` (one prompt for n
samples) and :func:`cat_text` (the rows of several conditions, e.g. conditional and unconditional
prompts as one batch of 2B for classifier-free guidance; shorter token sequences are padded with
masked-out tokens, which do not change the output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TextCondition:
    """Token embeddings, their padding mask and a pooled embedding of B prompts.

    tokens: (B, L, D) float; mask: (B, L), True (or 1) where a token is real, False (0) for padding,
    None when every token is real (stored as bool); pooled: (B, P) float or None.
    """

    tokens: torch.Tensor
    mask: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"TextCondition.tokens must have shape (B, L, D), got {tuple(self.tokens.shape)}")
        b, length = self.tokens.shape[:2]
        if self.mask is not None:
            if tuple(self.mask.shape) != (b, length):
                raise ValueError(f"TextCondition.mask must have shape ({b}, {length}) like its tokens, "
                                 f"got {tuple(self.mask.shape)}")
            object.__setattr__(self, "mask", self.mask.bool())  # a tokenizer's 0/1 attention mask
        if self.pooled is not None and (self.pooled.dim() != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"TextCondition.pooled must have shape ({b}, P), got {tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> "TextCondition":
        """The rows ``rows`` (a slice, or a 1-D index or bool tensor) as a TextCondition."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return TextCondition(self.tokens[rows], _rows(self.mask, rows), _rows(self.pooled, rows))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TextCondition":
        """On ``device``; the embeddings (not the mask) cast to ``dtype`` when given."""
        return TextCondition(self.tokens.to(device, dtype), None if self.mask is None else self.mask.to(device),
                             None if self.pooled is None else self.pooled.to(device, dtype))

    def chunk(self, k: int) -> list:
        """Split into the row chunks ``torch.chunk`` makes of a (B, ...) tensor."""
        return [self[rows] for rows in torch.arange(len(self)).chunk(k)]

    def expand(self, n: int) -> "TextCondition":
        """One row repeated to n rows (a condition of n rows is returned as it is)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"a TextCondition of {len(self)} rows cannot be expanded to {n} rows (only 1 or {n})")
        return self[torch.zeros(n, dtype=torch.long, device=self.tokens.device)]

    def full_mask(self) -> torch.Tensor:
        """The padding mask (B, L) bool, all True when ``mask`` is None."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)


def _rows(x: Optional[torch.Tensor], rows) -> Optional[torch.Tensor]:
    return None if x is None else x[rows]


def cat_text(conds: Sequence[TextCondition]) -> TextCondition:
    """The rows of ``conds`` in order, as one TextCondition.

    Token sequences shorter than the longest are padded with zero embeddings that the mask marks
    as padding (masked-out tokens leave a denoiser's output unchanged).  Pooled embeddings must be
    given for all or none.
    """
    if not conds:
        raise ValueError("cat_text needs at least one TextCondition")
    length = max(c.tokens.shape[1] for c in conds)
    has_pooled = {c.pooled is not None for c in conds}
    if len(has_pooled) > 1:
        raise ValueError("cat_text: some TextConditions have a pooled embedding and some do not")
    any_mask = any(c.mask is not None or c.tokens.shape[1] < length for c in conds)
    tokens = torch.cat([F.pad(c.tokens, (0, 0, 0, length - c.tokens.shape[1])) for c in conds])
    mask = torch.cat([F.pad(c.full_mask(), (0, length - c.tokens.shape[1]), value=False) for c in conds]) \
        if any_mask else None
    pooled = torch.cat([c.pooled for c in conds]) if has_pooled == {True} else None
    return TextCondition(tokens, mask, pooled)


def check_text_condition(cond, batch: int, context_dim: int, pooled_dim: Optional[int]) -> TextCondition:
    """``cond`` checked against a text-conditioned denoiser: B = ``batch`` rows, token width ``context_dim``,
    a pooled embedding of width ``pooled_dim`` exactly when the model takes one; ValueError otherwise.

    Anything with ``tokens``, ``mask`` and ``pooled`` (a text encoder's output) is taken as a TextCondition."""
    if not isinstance(cond, TextCondition) and all(hasattr(cond, k) for k in ("tokens", "mask", "pooled")):
        cond = TextCondition(cond.tokens, cond.mask, cond.pooled)
    if not isinstance(cond, TextCondition):
        raise ValueError(f"this denoiser cross-attends to text (unet.context_dim={context_dim}): give it "
                         f"cond=TextCondition(tokens (B, L, {context_dim}), mask, pooled), got "
                         f"{type(cond).__name__}")
    if len(cond) != batch or cond.tokens.shape[2] != context_dim:
        raise ValueError(f"the text condition's tokens have shape {tuple(cond.tokens.shape)}; this denoiser needs "
                         f"({batch}, L, {context_dim}) for x_t of {batch} rows")
    if pooled_dim is None and cond.pooled is not None:
        raise ValueError("the text condition has a pooled embedding, but the denoiser takes none "
                         "(unet.pooled_dim is null)")
    if pooled_dim is not None and (cond.pooled is None or cond.pooled.shape[1] != pooled_dim):
        got = "none" if cond.pooled is None else f"width {cond.pooled.shape[1]}"
        raise ValueError(f"the denoiser adds a pooled text embedding of width {pooled_dim} (unet.pooled_dim) to "
                         f"the time embedding; the text condition has {got}")
    return cond
