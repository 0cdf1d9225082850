"""A small residual MLP denoiser for 2D toy data (swiss roll, moons, ...)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.models.unet import add_class_embedding, batch_timesteps, timestep_embedding


class _Block(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(h)) + Linear(emb))): (B, hidden), (B, hidden) -> (B, hidden)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(F.silu(h)) + self.emb_proj(emb)  # time (+ class) information in every layer
        return h + self.fc2(F.silu(z))


class MLPDenoiser(nn.Module):
    """forward(x (B, dim), t (B,) or scalar, y (B,) or None) -> (B, out_dim or dim).

    Sinusoidal time embedding -> Linear -> SiLU -> Linear (width ``hidden``), plus an optional
    class embedding with ``num_classes + 1`` rows (row ``num_classes`` = "no label", used when
    ``y`` is None); ``num_layers`` residual blocks on Linear(x), each taking SiLU(embedding).
    The output layer is zero-initialised, so a new model predicts 0.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 128,
        num_classes: Optional[int] = None,
        out_dim: Optional[int] = None,
    ):
        super().__init__()
        self.dim, self.out_dim, self.time_embed_dim = dim, out_dim or dim, time_embed_dim
        self.num_classes = num_classes
        self.time_embed = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.fc_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, self.out_dim)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiser expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        b = x.shape[0]
        t = batch_timesteps(t, b, x.device)
        emb = self.time_embed(timestep_embedding(t, self.time_embed_dim).to(x.dtype))
        emb = F.silu(add_class_embedding(emb, self.class_embed, self.num_classes, y))
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.norm_out(h)))
