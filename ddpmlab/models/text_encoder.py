"""Text encoders: what a text-conditioned denoiser's ``cond`` carries, and the small one a run trains itself.

Every text encoder (this module's :class:`OwnTextEncoder`, and a frozen Hugging Face one of
:mod:`ddpmlab.models.text_frozen`) is a :class:`TextEncoder`:

* ``encoder.tokenize(texts) -> (ids (B, L) int64, mask (B, L) bool)``, L = ``encoder.max_length``, the mask
  True on real tokens (a prompt over L tokens is truncated with a one-line warning);
* ``encoder(ids, mask) -> TextCondition(tokens (B, L, D), mask (B, L) bool, pooled (B, P) or None)``,
  D = ``encoder.width``, P = ``encoder.pooled_width`` (None: the encoder has no pooled embedding): the record
  a text-conditioned denoiser reads as its ``cond`` (:mod:`ddpmlab.models.text_condition`);
* ``encoder.encode(texts)``: the two together, on the encoder's device.

:class:`OwnTextEncoder` is GLIDE's (Nichol et al. 2022, Sec. 4; ``glide_text2im/xf.py``): token plus learned
position embeddings, pre-LN transformer blocks (self-attention over the real tokens, an MLP of 4 x width), a
final LayerNorm; its pooled embedding is the ``[EOS]`` token's output (the last real token), where GLIDE
reads the last position.  It is trained with the denoiser; its tokenizer is the run's
(:class:`ddpmlab.data.tokenizer.CaptionTokenizer`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.models.text_condition import TextCondition


class TextEncoder(nn.Module):
    """The interface of every text encoder (see the module docstring); subclasses set the attributes."""

    width: int  # D
    pooled_width: Optional[int]  # P, None: no pooled embedding
    max_length: int  # L
    trainable: bool  # trained with the denoiser (own) or frozen (embeddings may be cached)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> TextCondition:
        """``texts`` (B strings) tokenized and encoded on the encoder's device."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string; wrap it: encode([text])")
        ids, mask = self.tokenize(list(texts))
        device = next(self.parameters()).device
        return self(ids.to(device), mask.to(device))


class TextBlock(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (Vaswani et al. 2017; the pre-LN
    order of GPT-2 and GLIDE)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V over the real tokens (``mask`` (B, L) True) as keys."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, L, D))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


POOLINGS = ("eos", "mean")


def pool(x: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, D) token outputs, (B, L) bool mask -> (B, D): the last real token's output ("eos") or the mean of the
    real tokens' outputs ("mean", Imagen's mean pooling); a caption with no real token pools its first token."""
    if pooling == "mean":
        weights = mask.to(x.dtype)
        weights[:, 0] = weights[:, 0].clamp(min=(mask.sum(1) == 0).to(x.dtype))
        return (x * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    last = mask.long().sum(1) - 1  # the [EOS] token: the last real one
    return x[torch.arange(len(x), device=x.device), last.clamp(min=0)]


class OwnTextEncoder(TextEncoder):
    """GLIDE's text transformer (module docstring), trained with the denoiser; pooled_width = width."""

    trainable = True

    def __init__(self, tokenizer: CaptionTokenizer, width: int = 512, depth: int = 4, heads: int = 8,
                 pooling: str = "eos"):
        super().__init__()
        if width % heads:
            raise ValueError(f"text.heads={heads} must divide text.width={width}")
        if pooling not in POOLINGS:
            raise ValueError(f"text.pooling='{pooling}' is not one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.width = self.pooled_width = int(width)
        self.max_length = tokenizer.max_length
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.max_length, width))
        self.blocks = nn.ModuleList(TextBlock(width, heads) for _ in range(depth))
        self.final_ln = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # GPT-2's initialisation, as GLIDE's
        nn.init.normal_(self.positional_embedding, std=0.01)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """``ids``, ``mask``: (B, L) as :meth:`tokenize` gives them -> :class:`TextCondition`, pooled (B, width)."""
        mask = mask.bool()
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.final_ln(x)
        return TextCondition(x, mask, pool(x, mask, self.pooling))
