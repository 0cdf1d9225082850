"""Stable Diffusion's transformer block: self-attention, cross-attention to text, feed-forward.

Rombach et al. 2022 (latent diffusion), Sec. 3.3: the UNet's attention blocks become transformers
whose cross-attention reads the token embeddings tau(y) of a prompt,
Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y).
The layout is diffusers' ``Transformer2DModel`` (``use_linear_projection=True``) with
``BasicTransformerBlock``s, names in brackets::

    norm            GroupNorm(groups, C, eps 1e-6)                                   [norm]
    proj_in         Linear C -> C on the H W positions, (B, C, H, W) -> (B, HW, C)    [proj_in]
    (positions)     + the 2-D sin-cos embedding of each position, where asked (not in Stable Diffusion)
    depth blocks    x = x + SelfAttention(LayerNorm(x))                              [blocks.i.norm1, attn1]
                    x = x + CrossAttention(LayerNorm(x), tokens, mask)               [blocks.i.norm2, attn2]
                    x = x + GEGLU feed-forward(LayerNorm(x)), width 4C               [blocks.i.norm3, ff]
    proj_out        Linear C -> C back to (B, C, H, W), zero-initialised by the UNet  [proj_out]
    residual        x + the above

GEGLU (Shazeer 2020, Eq. 6): FFN(x) = (x W + b) * GELU(x V + c), then a linear map back to C.
Queries, keys and values have no bias (as in diffusers); the heads are C / heads wide.

``positions=True`` adds the fixed 2-D sin-cos embedding of the feature map's positions (Vaswani et al. 2017,
Sec. 3.5, in two dimensions as ViT-MAE and DiT do) to the tokens after proj_in: a query then knows where it is,
so cross-attention can send "on the left" to the left of the picture directly, which a UNet otherwise learns only
from its convolutions' borders (slowly: in a short run, sometimes not at all).  It has no weights; diffusers'
Transformer2DModel has no such embedding, so such a UNet does not export.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.models.fast_ops import attention

GROUP_NORM_EPS = 1e-6  # diffusers' Transformer2DModel fixes it, whatever the UNet's norm_eps
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's default


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Transformer position embedding (Vaswani et al. 2017, Sec. 3.5): (M,) -> (M, dim), [sin, cos] halves."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """2-D sin-cos embedding of a grid_h x grid_w token grid, row-major: (grid_h * grid_w, dim), float32.

    Token (i, j) gets [sincos_1d(dim/2, j), sincos_1d(dim/2, i)]: the first half encodes the column,
    the second the row (MAE / DiT code).
    """
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the keys where ``mask`` is True: q (B, h, N, d), k, v (B, h, L, d),
    mask (B, L) bool -> (B, h, N, d).

    A row whose mask is all False attends to nothing: its output is 0 (softmax over no keys is undefined;
    attending to all of them and zeroing the result keeps the gradients finite).
    """
    keep = mask.any(dim=-1)  # (B,)
    mask = (mask | ~keep[:, None])[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out * keep[:, None, None, None].to(out.dtype)


class Attention(nn.Module):
    """Multi-head attention of x (B, N, C) to a context (B, L, D_ctx) (x itself when None): (B, N, C).

    ``context_dim`` None: self-attention; else cross-attention to token embeddings of that width.
    ``mask`` (B, L) bool: which context tokens are real (True) and which padding (False).
    ``bias``: biases on the query, key and value maps (Stable Diffusion has none, PixArt-alpha has them).
    """

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} attention heads do not divide the {dim}-channel attention inputs")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, N, C / heads)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        # Vaswani et al. 2017, Eq. 1; Rombach et al. 2022, Sec. 3.3 (queries from the image, keys and values from text)
        out = attention(q, k, v) if mask is None else masked_attention(q, k, v, mask)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLUFeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020, Eq. 6): (B, N, C) -> (B, N, C), inner width mult * C."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)  # [x W + b ; x V + c]
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward, each pre-LayerNorm and residual: (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), tokens, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """The transformer on a feature map: x (B, C, H, W), tokens (B, L, D_ctx), mask (B, L) -> (B, C, H, W)."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1, groups: int = 32,
                 positions: bool = False):
        super().__init__()
        self.positions = positions
        self.norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        if self.positions:
            h = h + sincos_2d(c, hgt, wid, device=x.device).to(h.dtype)
        for block in self.blocks:
            h = block(h, tokens, mask)
        return x + self.proj_out(h).transpose(1, 2).reshape(b, c, hgt, wid)
