"""The denoiser a config describes, and its size."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ddpmlab.config import Config, diffwave_settings, dit_settings
from ddpmlab.data import data_shape
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.models.conditioned import condition_channels, conditioned
from ddpmlab.models.diffwave import DiffWave
from ddpmlab.models.dit import DiT
from ddpmlab.models.dit_text import TextDiT
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.models.preconditioning import EDMPreconditioned
from ddpmlab.models.unet import UNet


def build_model(cfg: Config, out_channels_multiplier: Optional[int] = None) -> nn.Module:
    """The denoiser for ``cfg``: a UNet (model.kind 'unet'), a DiT ('dit'; PixArt-alpha's TextDiT with
    dit.context_dim), an MLPDenoiser on 2D points ('mlp') or DiffWave on sound ('diffwave').

    The output has ``out_channels_multiplier`` times the data channels; by default 2 when
    ``diffusion.variance`` is learned_range (eps and the variance head), else 1.
    Raises ConfigError when the model does not fit the data (e.g. unet.attention_resolutions
    naming a height no UNet level has).
    """
    if out_channels_multiplier is None:
        out_channels_multiplier = 2 if cfg.diffusion.variance == "learned_range" else 1
    net = _network(cfg, out_channels_multiplier)
    net = conditioned(cfg, net, data_shape(cfg))  # model.condition=low_res: SR3's concatenated low-res image
    if cfg.diffusion.prediction == "edm":  # Karras et al. 2022: the network inside c_in, c_skip, c_out
        return EDMPreconditioned(net, NoiseSchedule.from_config(cfg.diffusion), cfg.diffusion.sigma_data)
    return net


def _network(cfg: Config, out_channels_multiplier: int) -> nn.Module:
    if cfg.model.kind == "mlp":
        return _mlp(cfg, out_channels_multiplier)
    if cfg.model.kind == "dit":
        return _dit(cfg, out_channels_multiplier)
    if cfg.model.kind == "diffwave":
        return _diffwave(cfg, out_channels_multiplier)
    return _unet(cfg, out_channels_multiplier)


def _mlp(cfg: Config, out_channels_multiplier: int) -> MLPDenoiser:
    m = cfg.mlp
    return MLPDenoiser(dim=2, hidden=m.hidden, num_layers=m.num_layers, time_embed_dim=m.time_embed_dim,
                       num_classes=cfg.model.num_classes, out_dim=2 * out_channels_multiplier)


def _unet(cfg: Config, out_channels_multiplier: int) -> UNet:
    m = cfg.unet
    channels, height, width = data_shape(cfg)
    return UNet(
        in_channels=channels + condition_channels(cfg, channels),
        out_channels=channels * out_channels_multiplier,
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        dropout=m.dropout,
        num_heads=m.num_heads,
        norm_groups=m.norm_groups,
        num_classes=cfg.model.num_classes,
        image_size=(height, width),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        context_dim=m.context_dim,
        transformer_depth=m.transformer_depth,
        pooled_dim=m.pooled_dim,
        positions=m.positions,
    )


def _dit(cfg: Config, out_channels_multiplier: int) -> nn.Module:
    """The DiT of Peebles & Xie, or PixArt-alpha's text DiT when dit.context_dim is set."""
    m = cfg.model
    channels, height, width = data_shape(cfg)
    sizes = dit_settings(cfg.dit)  # dit.preset's sizes, or the explicit dit.* keys
    shared = dict(in_channels=channels + condition_channels(cfg, channels),
                  out_channels=channels * out_channels_multiplier, image_size=(height, width),
                  patch_size=sizes["patch_size"], hidden=sizes["hidden"], depth=sizes["depth"],
                  num_heads=sizes["heads"], mlp_ratio=cfg.dit.mlp_ratio, num_classes=m.num_classes,
                  gradient_checkpointing=m.gradient_checkpointing)
    if cfg.dit.context_dim is not None:
        return TextDiT(**shared, context_dim=cfg.dit.context_dim, pooled_dim=cfg.dit.pooled_dim)
    return DiT(**shared)


def _diffwave(cfg: Config, out_channels_multiplier: int) -> DiffWave:
    """Kong et al. 2021's DiffWave on waveforms (C, L), sized by diffwave.preset or its keys; with
    model.condition=mel, its local conditioner (a vocoder)."""
    w, channels = cfg.diffwave, int(cfg.data.channels)
    sizes = diffwave_settings(w)
    mel = channels * cfg.data.n_mels if cfg.model.condition == "mel" else None  # a vocoder: each channel's bands
    return DiffWave(in_channels=channels, out_channels=channels * out_channels_multiplier, layers=sizes["layers"],
                    channels=sizes["channels"], dilation_cycle=sizes["dilation_cycle"], embed_dim=w.embed_dim,
                    num_classes=cfg.model.num_classes, label_dim=w.label_dim, mel_channels=mel,
                    upsample=tuple(w.upsample))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())
