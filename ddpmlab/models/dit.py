"""The diffusion transformer (DiT) of Peebles & Xie 2023, "Scalable Diffusion Models with Transformers".

Layout (Sec. 3.2, Fig. 3; the names of the parameters in brackets)::

    patchify       p x p conv with stride p: (B, C, H, W) -> (B, T, d), T = H W / p^2    [patch_embed]
                   + fixed 2-D sin-cos position embedding (frozen, as in the paper's code) [pos_embed]
    conditioning   c = MLP(sinusoidal(t)) + Embedding(y)                                 [time_embed, class_embed]
                   (class_embed has num_classes + 1 rows, row num_classes = "no label")
    N blocks       adaLN-Zero: (shift, scale, gate) x 2 = Linear(SiLU(c)), zero-initialised  [blocks.i.modulation]
                   x = x + gate_1 * Attention(LN(x) (1 + scale_1) + shift_1)                 [blocks.i.attn]
                   x = x + gate_2 * MLP(LN(x) (1 + scale_2) + shift_2)                       [blocks.i.mlp]
    final layer    LN(x) (1 + scale) + shift, Linear to p^2 * out_channels, both zero-init  [final]
    unpatchify     (B, T, p^2 out) -> (B, out_channels, H, W)

With adaLN-Zero every block is the identity at initialisation and the model outputs 0.
``out_channels`` is ``2 * in_channels`` for a learned variance (diffusion.variance learned_range;
the paper's "learned sigma", Sec. 3.1). The parameter counts of the 12 presets (Table 1) equal
those of the paper's code, frozen position embedding included (DiT-XL/2 on 32x32x4 latents
with 1000 classes: 675,129,632).

The time frequencies follow diffusers' ``DiTTransformer2DModel`` (w_k = 10000^(-k / (128 - 1)),
[cos, sin]; ``time_shift=1``) so that an exported model computes the same function; the paper's code
divides by 128 (``time_shift=0``). Class-label dropout for classifier-free guidance (Ho & Salimans
2022) is the trainer's (``train.label_dropout``), as for the UNet; ``y=None`` means "no label".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpmlab.config import DIT_PRESETS
from ddpmlab.errors import ConfigError
from ddpmlab.models.transformer import sincos_2d
from ddpmlab.models.unet import add_class_embedding, batch_timesteps, timestep_embedding

FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the time MLP (the paper's code)
NORM_EPS = 1e-6  # LayerNorm eps of the paper's code


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (Peebles & Xie 2023, Sec. 3.2): x (B, T, d) * (1 + scale (B, d)) + shift (B, d)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over the tokens: (B, T, d) -> (B, T, d)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: [q; k; v], each (d, d)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v: (B, heads, T, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """Pointwise feed-forward: Linear -> GELU (tanh approximation) -> Linear, (B, T, d) -> (B, T, d)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: x (B, T, d), c (B, d) -> (B, T, d)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: gates 0, the block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a linear map of each token to its p x p x out_channels patch: (B, T, d) -> (B, T, p^2 out)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def check_patch(image_size: tuple, patch_size: int) -> None:
    """ConfigError unless ``patch_size`` divides both sides of ``image_size`` (H, W)."""
    h, w = image_size
    if h % patch_size or w % patch_size:
        g = math.gcd(h, w)
        ok = [p for p in range(2, min(g, 16) + 1) if g % p == 0][:4] or [1]
        up = [patch_size * -(-s // patch_size) for s in (h, w)]
        raise ConfigError(f"the model's input {h}x{w} (data.image_size, or the dataset's size) is not divisible by "
                          f"dit.patch_size={patch_size}: the DiT cuts it into {patch_size}x{patch_size} patches; "
                          f"use a patch size dividing both sides (e.g. {', '.join(map(str, ok))}) or images of "
                          f"{up[0]}x{up[1]} (data.image_size={up})")


def dit_geometry(image_size, patch_size: int, hidden: int, num_heads: int) -> Tuple[tuple, tuple]:
    """(image_size (H, W), patch grid) of a DiT, after checking the patch size and the width (both DiTs)."""
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    check_patch(image_size, patch_size)
    if hidden % num_heads or hidden % 4:
        raise ConfigError(f"dit.hidden={hidden} must be a multiple of 4 and of dit.heads={num_heads}")
    return image_size, (image_size[0] // patch_size, image_size[1] // patch_size)


def unpatchify(tokens: torch.Tensor, grid: tuple, p: int, c: int) -> torch.Tensor:
    """(B, T, p * p * c) -> (B, c, H, W) for a grid (H / p, W / p) of tokens; each token's values are (p, p, c)
    row-major."""
    gh, gw = grid
    x = tokens.reshape(tokens.shape[0], gh, gw, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, gh * p, gw * p)


class DiT(nn.Module):
    """Diffusion transformer: forward(x (B,C,H,W), t (B,) or scalar, y (B,) or None) -> (B, out_channels, H, W).

    ``t`` are integer (or fractional) timesteps as for the UNet; ``y`` class labels in
    [0, num_classes], ``num_classes`` being the "no label" row (also used for ``y=None``).
    ``gradient_checkpointing`` recomputes each block's activations in the backward pass
    (training only; same gradients, less memory).
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
        gradient_checkpointing: bool = False,
        time_shift: float = 1.0,
    ):
        super().__init__()
        image_size, self.grid = dit_geometry(image_size, patch_size, hidden, num_heads)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size, self.patch_size, self.hidden = image_size, patch_size, hidden
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self.time_shift = time_shift

        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        # fixed, not learned; a (frozen) parameter as in the paper's code, so the counts agree
        self.pos_embed = nn.Parameter(sincos_2d(hidden, *self.grid)[None], requires_grad=False)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden, patch_size, self.out_channels)
        self._init_weights()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DiT":
        """One of the 12 models of Table 1 ('DiT-S/2' ... 'DiT-XL/8'); kwargs: the other constructor arguments."""
        if name not in DIT_PRESETS:
            raise ConfigError(f"unknown dit.preset {name!r}; choose one of {', '.join(DIT_PRESETS)}")
        p = DIT_PRESETS[name]
        return cls(patch_size=p["patch_size"], hidden=p["hidden"], depth=p["depth"], num_heads=p["heads"],
                   **kwargs)

    def _init_weights(self) -> None:
        """The paper's code: Xavier-uniform linear maps (the patch conv as one), N(0, 0.02) embeddings, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, t, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """The conditioning c = time embedding + class embedding: (B, hidden)."""
        t = batch_timesteps(t, batch, device)
        freqs = timestep_embedding(t, FREQ_DIM, shift=self.time_shift, flip=True)
        c = self.time_embed(freqs.to(self.patch_embed.weight.dtype))
        return add_class_embedding(c, self.class_embed, self.num_classes, y)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, T, hidden), with the position embedding added."""
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p * p * out_channels) -> (B, out_channels, H, W); each token's values are (p, p, C) row-major."""
        return unpatchify(tokens, self.grid, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(f"DiT expects x of shape (B, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}) (its position embedding is fixed), got {tuple(x.shape)}")
        c = self.embed(t, y, x.shape[0], x.device)
        h = self.patchify(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if recompute else block(h, c)
        return self.unpatchify(self.final(h, c))
