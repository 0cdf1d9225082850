"""Conditioned denoisers: super-resolution by concatenation (SR3, Saharia et al. 2021, Sec. 2.1), and the
conditioning of every kind (a low-res image, a vocoder's mel spectrogram) made from a clean example.

SR3 feeds the denoiser the low-resolution image, upsampled to the target size with bicubic
interpolation, concatenated with x_t along the channels: f_theta(concat(u(x_low), x_t), t).
Here that is two small pieces:

* :class:`ConcatConditioned` wraps any denoiser built with ``in_channels = C + C_cond``;
  its ``forward(x, t, y=None, cond=None)`` concatenates ``cond`` (B, C_cond, H, W) to x_t.
* :func:`bind_condition` fixes a conditioning tensor, giving a plain denoiser ``model(x, t, y)``:
  every sampler, guidance and the training objective use it unchanged.

The conditioning itself is made from a high-resolution image by :func:`low_res` (downsample
to ``data.low_res``) and :func:`upsample` (back to the image size, ``data.upsample``); in
training, optional Gaussian noise on it (:func:`augment_condition`) is the conditioning
augmentation of cascaded diffusion models (Ho et al. 2022, Sec. 4.1).

A vocoder (model.condition=mel; DiffWave's local conditioner, Kong et al. 2021, Sec. 3.2) is conditioned
on the log-mel spectrogram of its waveform (:func:`mel_condition`); DiffWave reads it as ``cond`` itself,
and it reaches the network by the same path (:func:`bind_condition`) in training and in every sampler.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.config import DOWNSAMPLE_MODES, UPSAMPLE_MODES, Config
from ddpmlab.data.mel import config_mel
from ddpmlab.errors import ConfigError, DDPMError


def condition_channels(cfg: Config, data_channels: int) -> int:
    """The extra input channels a denoiser of ``cfg`` gets: the low-res image's (its data channels), or 0."""
    return data_channels if cfg.model.condition == "low_res" else 0


class ConcatConditioned(nn.Module):
    """``forward(x_t, t, y=None, cond=None) = denoiser(concat(x_t, cond), t, y)`` (SR3, Saharia et al. 2021).

    x_t: (B, C, H, W); cond: (B, cond_channels, H, W) on x_t's scale ([-1, 1]).  ``denoiser`` takes
    C + cond_channels input channels and returns the usual output (eps, x0 or v for the C data
    channels).  Its parameters are the denoiser's (state-dict keys ``denoiser.*``).
    """

    def __init__(self, denoiser: nn.Module, cond_channels: int):
        super().__init__()
        self.denoiser = denoiser
        self.cond_channels = int(cond_channels)
        self.num_classes = getattr(denoiser, "num_classes", None)  # read by classifier-free guidance

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cond is None:
            raise DDPMError("this denoiser is conditioned on a low-resolution image (model.condition=low_res): "
                            "give it cond=..., e.g. sample it with `ddpm upscale RUN --image low.png`")
        if cond.shape[0] != x.shape[0] or cond.shape[1] != self.cond_channels or cond.shape[2:] != x.shape[2:]:
            raise DDPMError(f"the conditioning has shape {tuple(cond.shape)}; this denoiser needs "
                            f"({x.shape[0]}, {self.cond_channels}, {x.shape[2]}, {x.shape[3]}) for x_t of shape "
                            f"{tuple(x.shape)}")
        return self.denoiser(torch.cat([x, cond.to(device=x.device, dtype=x.dtype)], dim=1), t, y)


class BoundCondition(nn.Module):
    """A conditioned denoiser with its conditioning fixed: ``forward(x_t, t, y=None)``.

    Row i of a batch sees row ``i mod n`` of the n bound rows, so a batch of k * n rows (classifier-free
    guidance runs its conditional and unconditional halves as one batch of 2n) sees them repeated.
    ``cond`` is a tensor (n, ...) or a :class:`~ddpmlab.models.text_condition.TextCondition` of n rows.
    """

    def __init__(self, model: nn.Module, cond):
        super().__init__()
        self.model = model
        self.cond = cond  # a plain attribute: never in a state dict
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        cond = self.cond.to(x.device)
        if len(cond) != x.shape[0]:
            cond = cond[torch.arange(x.shape[0], device=x.device) % len(cond)]
        return self.model(x, t, y, cond=cond)


def bind_condition(model: nn.Module, cond) -> BoundCondition:
    """``model`` (forward(x, t, y, cond)) with ``cond`` (n, C_cond, H, W), or a TextCondition of n rows, fixed:
    a plain denoiser(x, t, y)."""
    return BoundCondition(model, cond)


def _size(size: Sequence[int]) -> tuple:
    return (int(size[0]), int(size[-1]))


def downsample(x: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w): area (the mean of each block; the exact box filter for integer factors)
    or antialiased bicubic."""
    if mode == "area":
        return F.interpolate(x, size=_size(size), mode="area")
    if mode == "bicubic":
        return F.interpolate(x, size=_size(size), mode="bicubic", align_corners=False, antialias=True)
    raise ConfigError(f"data.downsample: unknown mode '{mode}'; choose one of {', '.join(DOWNSAMPLE_MODES)}")


def upsample(x: torch.Tensor, size: Sequence[int], mode: str = "bicubic") -> torch.Tensor:
    """(B, C, h, w) in [-1, 1] -> (B, C, H, W): bicubic (Keys a = -0.75, as PyTorch), bilinear or nearest;
    clamped to [-1, 1] (bicubic overshoots at edges)."""
    if mode == "nearest":
        return F.interpolate(x, size=_size(size), mode="nearest-exact")
    if mode in ("bicubic", "bilinear"):
        return F.interpolate(x, size=_size(size), mode=mode, align_corners=False).clamp(-1.0, 1.0)
    raise ConfigError(f"data.upsample: unknown mode '{mode}'; choose one of {', '.join(UPSAMPLE_MODES)}")


def low_res(x_high: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The low-resolution images of ``cfg`` (data.low_res, data.downsample) made from x_high (B, C, H, W)."""
    return downsample(x_high, cfg.data.low_res, cfg.data.downsample)


def condition_from_low_res(x_low: torch.Tensor, cfg: Config, size: Sequence[int]) -> torch.Tensor:
    """The denoiser's conditioning: low-res images (B, C, h, w) upsampled to ``size`` (H, W) by data.upsample."""
    return upsample(x_low, size, cfg.data.upsample)


def condition_from_high_res(x_high: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The conditioning training uses: x_high (B, C, H, W) downsampled to data.low_res, upsampled back."""
    return condition_from_low_res(low_res(x_high, cfg), cfg, x_high.shape[2:])


def augment_condition(cond: torch.Tensor, max_std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Conditioning augmentation (Ho et al. 2022, Sec. 4.1): cond + s * N(0, I), s ~ U[0, max_std] per image.

    The network is not told s (the non-truncated Gaussian augmentation without the level as an input);
    at sampling the conditioning is clean (s = 0, inside the training range).
    """
    if max_std <= 0:
        return cond
    b = cond.shape[0]
    dev = generator.device if generator is not None else cond.device
    s = torch.rand((b, 1, 1, 1), generator=generator, device=dev) * max_std
    z = torch.randn(cond.shape, generator=generator, device=dev)
    return cond + (s * z).to(cond.device, cond.dtype)


def mel_condition(x: torch.Tensor, data) -> torch.Tensor:
    """A vocoder's conditioning (model.condition=mel): the log-mel spectrograms of sounds x (B, C, L) with the
    data section's settings (data.mel.config_mel), the C channels' bands stacked: (B, C * n_mels, 1 + L // hop)."""
    mel = config_mel(x.float(), data)
    return mel.reshape(mel.shape[0], -1, mel.shape[-1])


def example_condition(x0: torch.Tensor, cfg: Config):
    """What clean examples x0 are conditioned on, as model.condition says: low_res, their low-res versions
    upsampled back (SR3); mel, their log-mel spectrograms (a vocoder); none, None."""
    if cfg.model.condition == "low_res":
        return condition_from_high_res(x0, cfg)
    if cfg.model.condition == "mel":
        return mel_condition(x0, cfg.data)
    return None


def training_condition(x0: torch.Tensor, cfg: Config, generator: Optional[torch.Generator] = None):
    """What a training batch x0 is conditioned on (:func:`example_condition`); a low-res image with conditioning
    augmentation of std up to train.cond_noise."""
    cond = example_condition(x0, cfg)
    if cfg.model.condition != "low_res":
        return cond
    return augment_condition(cond, cfg.train.cond_noise, generator)


def conditioned(cfg: Config, net: nn.Module, shape: Sequence[int]) -> nn.Module:
    """``net`` wrapped as ``cfg.model.condition`` says for data of ``shape`` (C, H, W): low_res, a
    :class:`ConcatConditioned` (data.low_res checked against H, W); none or mel (DiffWave reads the mel
    itself), ``net`` unchanged."""
    if cfg.model.condition != "low_res":
        return net
    check_low_res(cfg, shape)
    return ConcatConditioned(net, condition_channels(cfg, int(shape[0])))


def check_low_res(cfg: Config, shape: Sequence[int]) -> None:
    """ConfigError unless data.low_res fits inside the image size of ``shape`` (C, H, W)."""
    if cfg.model.condition != "low_res":
        return
    h, w = int(shape[1]), int(shape[2])
    lh, lw = _size(cfg.data.low_res)
    if lh > h or lw > w:
        raise ConfigError(f"data.low_res {lh}x{lw} is larger than the images ({h}x{w}, height x width); "
                          f"set data.low_res to at most [{h}, {w}], e.g. [{max(h // 4, 1)}, {max(w // 4, 1)}]")
