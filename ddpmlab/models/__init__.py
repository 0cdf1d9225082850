"""Denoiser networks: the DDPM UNet for images and a residual MLP for 2D toy data."""

from __future__ import annotations

from torch import nn

from ..config import Config
from .mlp import MLPDenoiser
from .unet import UNet, timestep_embedding

__all__ = ["UNet", "MLPDenoiser", "build_model", "count_parameters", "timestep_embedding",
           "data_channels", "data_image_size"]

# bundled datasets with a fixed shape: (channels, (H, W))
_FIXED_SHAPES = {"mnist": (1, (28, 28)), "digits": (1, (8, 8))}


def data_channels(cfg: Config) -> int:
    """Image channels of the configured dataset (1 for mnist/digits, else data.channels)."""
    return _FIXED_SHAPES.get(cfg.data.dataset, (cfg.data.channels, None))[0]


def data_image_size(cfg: Config) -> tuple:
    """(H, W) of the configured dataset's images ((28, 28) mnist, (8, 8) digits, else data.image_size)."""
    return tuple(_FIXED_SHAPES.get(cfg.data.dataset, (None, cfg.data.image_size))[1])


def build_model(cfg: Config, out_channels_multiplier: int = 1) -> nn.Module:
    """The denoiser for ``cfg``: a UNet (model.kind 'unet') or an MLPDenoiser on 2D points ('mlp').

    The output has ``out_channels_multiplier`` times the data channels (e.g. 2 for a model that
    also predicts variances). Raises ConfigError when the model does not fit the data.
    """
    m = cfg.model
    if m.kind == "mlp":
        return MLPDenoiser(dim=2, hidden=m.hidden, num_layers=m.num_layers, time_embed_dim=m.time_embed_dim,
                           num_classes=m.num_classes, out_dim=2 * out_channels_multiplier)
    channels = data_channels(cfg)
    return UNet(
        in_channels=channels,
        out_channels=channels * out_channels_multiplier,
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        dropout=m.dropout,
        num_heads=m.num_heads,
        norm_groups=m.norm_groups,
        num_classes=m.num_classes,
        image_size=data_image_size(cfg),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())
