"""A diffusion transformer that reads text: PixArt-alpha's blocks (Chen et al. 2023, Sec. 2.3).

PixArt-alpha adds to the DiT (Peebles & Xie 2023) a cross-attention layer between each block's
self-attention and MLP, and replaces the per-block adaLN-Zero MLPs by **adaLN-single**: one map
of the time embedding to the six modulations S = [shift, scale, gate] x 2, shared by all blocks,
plus a learned table E_i per block (S_i = S + E_i).  The layout is diffusers'
``PixArtTransformer2DModel`` (names in brackets)::

    patchify       p x p conv with stride p + fixed 2-D sin-cos positions   [patch_embed, pos_embed]
    time           c = MLP(sinusoidal(t)) (+ class embedding)               [time_embed, class_embed]
    adaLN-single   S = Linear(SiLU(c)), (B, 6 d), computed once             [t_block]
    text           tokens -> Linear -> GELU(tanh) -> Linear, width d        [caption_embed]
    N blocks       (shift1, scale1, gate1, shift2, scale2, gate2) = S + E_i  [blocks.i.scale_shift_table]
                   x = x + gate1 * SelfAttention(LN(x) (1 + scale1) + shift1) [blocks.i.attn1]
                   x = x + CrossAttention(x, text tokens, mask)              [blocks.i.attn2]
                   x = x + gate2 * MLP(LN(x) (1 + scale2) + shift2)          [blocks.i.mlp]
    final layer    (shift, scale) = c + E; Linear(LN(x) (1 + scale) + shift)  [final]

Why PixArt-alpha rather than SD3's joint attention (MMDiT): it keeps the DiT's image stream and adds
one layer per block, its text tokens pass one projection (no second transformer stream to train on a
CPU), padding is a plain key mask, and its weights load into diffusers' ``PixArtTransformer2DModel``
(:mod:`ddpmlab.io.diffusers_pixart`).  As diffusers', its timestep frequencies are
10000^(-k / 128), [cos, sin] (``time_shift`` 0).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpmlab.models.dit import FREQ_DIM, MLP, NORM_EPS, dit_geometry, unpatchify
from ddpmlab.models.text_condition import TextCondition, check_text_condition
from ddpmlab.models.transformer import Attention, sincos_2d
from ddpmlab.models.unet import add_class_embedding, batch_timesteps, timestep_embedding


class TextDiTBlock(nn.Module):
    """Self-attention, cross-attention and MLP with adaLN-single: x (B, T, d), s (B, 6 d), tokens (B, L, d),
    mask (B, L) -> (B, T, d)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn1 = Attention(dim, num_heads, bias=True)
        self.attn2 = Attention(dim, num_heads, context_dim=dim, bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)  # E_i

    def forward(self, x: torch.Tensor, s: torch.Tensor, tokens: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Chen et al. 2023, Sec. 2.3: S_i = S + E_i, each (B, 1, d)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + s.view(len(s), 6, -1)).chunk(
            6, dim=1)
        x = x + gate1 * self.attn1(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.attn2(x, tokens, mask)  # no norm before the cross-attention (PixArt-alpha's code)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TextFinalLayer(nn.Module):
    """LN modulated by the time embedding plus a learned table, then each token to its patch:
    x (B, T, d), c (B, d) -> (B, T, p^2 out)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class TextDiT(nn.Module):
    """forward(x (B,C,H,W), t (B,) or scalar, y (B,) or None, cond=TextCondition) -> (B, out_channels, H, W).

    ``context_dim``: the width D of the text encoder's tokens (projected to ``hidden``); ``pooled_dim``:
    a pooled text embedding added to the time embedding through Linear -> SiLU -> Linear (null: none).
    ``num_classes``: class labels beside the text, as the DiT's.  ``gradient_checkpointing`` recomputes
    each block's activations in the backward pass (training only).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        image_size: Union[int, Sequence[int]] = (32, 32),
        patch_size: int = 2,
        hidden: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: Optional[int] = None,
        *,
        context_dim: int = 4096,
        pooled_dim: Optional[int] = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        image_size, self.grid = dit_geometry(image_size, patch_size, hidden, num_heads)
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.image_size, self.patch_size, self.hidden = image_size, patch_size, hidden
        self.num_classes, self.context_dim, self.pooled_dim = num_classes, context_dim, pooled_dim
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(sincos_2d(hidden, *self.grid)[None], requires_grad=False)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        if pooled_dim is not None:
            self.pooled_embed = nn.Sequential(nn.Linear(pooled_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.caption_embed = nn.Sequential(nn.Linear(context_dim, hidden), nn.GELU(approximate="tanh"),
                                           nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([TextDiTBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = TextFinalLayer(hidden, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """PixArt-alpha's code: Xavier-uniform linear maps, N(0, 0.02) for the time, adaLN-single and caption
        maps, cross-attention outputs and the final linear map zero (the model starts at output 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for m in (self.time_embed[0], self.time_embed[2], self.t_block[1], self.caption_embed[0],
                  self.caption_embed[2]):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.attn2.to_out for b in self.blocks] + [self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, t, y: Optional[torch.Tensor], batch: int, device,
              pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The time embedding c (+ class) (+ pooled text): (B, hidden)."""
        freqs = timestep_embedding(batch_timesteps(t, batch, device), FREQ_DIM, shift=0.0, flip=True)
        c = self.time_embed(freqs.to(self.patch_embed.weight.dtype))
        if pooled is not None:
            c = c + self.pooled_embed(pooled.to(c.dtype))
        return add_class_embedding(c, self.class_embed, self.num_classes, y)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None,
                cond: Optional[TextCondition] = None) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(f"the DiT expects x of shape (B, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}) (its position embedding is fixed), got {tuple(x.shape)}")
        text = check_text_condition(cond, x.shape[0], self.context_dim, self.pooled_dim)
        c = self.embed(t, y, x.shape[0], x.device, text.pooled)
        s = self.t_block(c)  # adaLN-single: the modulations of every block, once
        tokens = self.caption_embed(text.tokens.to(c.dtype))
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, s, tokens, text.mask, use_reentrant=False) if recompute else \
                block(h, s, tokens, text.mask)
        return unpatchify(self.final(h, c), self.grid, self.patch_size, self.out_channels)
