"""DiffWave (Kong et al. 2021): a non-autoregressive denoiser of waveforms, x (B, C, L).

Kong et al. 2021, Sec. 3 and Fig. 2, in a page:

    input         Conv1x1(C -> channels) -> ReLU
    step_embed    t_embedding = [sin(10^(0*4/63) t), ..., sin(10^(63*4/63) t), cos(...)] (128; their Eq. 8),
                  then two FC + swish layers of width 512, shared by all layers
    layers[i]     residual layer: h + FC(step) -> dilated Conv(k=3, dilation 2^(i mod cycle), channels -> 2 channels)
                  (+ Conv1x1 of the global and the local condition as biases), tanh(a) * sigmoid(b)
                  (WaveNet's gated unit), Conv1x1 -> (residual, skip); the next input (h + residual) / sqrt(2)
    output        sum of the skips / sqrt(layers) -> Conv1x1 -> ReLU -> Conv1x1 (zero-initialised) -> C outputs

* the **global conditioner** (a class label; their Sec. 3.2): a shared label embedding of width
  ``label_dim`` (128), mapped by a bias-free Conv1x1 per layer.  Row ``num_classes`` is the "no label" of
  classifier-free guidance (Ho & Salimans 2022), as the UNet's; here it is zero and receives no gradient
  (``padding_idx``), so with the label dropped the network is exactly the unconditional DiffWave of the
  same weights;
* the **local conditioner** (a mel spectrogram, the vocoder; their Sec. 3.2 and App. A): the log-mel
  spectrogram (B, mel_channels, frames) of :func:`ddpmlab.data.mel.config_mel` (natural log, floored at
  1e-5), scaled to about [0, 1] (0 at the floor, 1 at magnitude 1, as Kong et al.'s code scales its
  decibels), seen as a one-channel image, is upsampled in time by two transposed 2-D convolutions (kernel
  3 x 2s, stride 1 x s, leaky ReLU 0.4) to exactly frames * s1 * s2 samples (s1 * s2 = the hop length),
  cut to L, and mapped by a Conv1x1 per layer.  Those Conv1x1 start at zero (unlike the paper's), so a
  fresh vocoder is exactly the unconditional network of the same weights until training moves them.

The receptive field of the dilated convolutions is 1 + 2 sum_i 2^(i mod cycle) samples (their Sec. 3.1:
6139 for 30 layers with cycle 10): :func:`receptive_field`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.data.mel import LOG_FLOOR
from ddpmlab.models.unet import add_class_embedding, batch_timesteps

STEP_ENCODING = 128  # the sinusoidal encoding of the diffusion step (Kong et al. 2021, Eq. 8)
LEAKY_SLOPE = 0.4  # the upsampler's leaky ReLU


def step_encoding(t: torch.Tensor, dim: int = STEP_ENCODING) -> torch.Tensor:
    """Kong et al. 2021, Eq. 8: (B,) steps -> (B, dim) [sin(10^(4j/(dim/2-1)) t), cos(...)], j < dim / 2."""
    half = dim // 2
    freqs = 10.0 ** (torch.arange(half, dtype=torch.float32, device=t.device) * 4.0 / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def receptive_field(layers: int, dilation_cycle: int, kernel: int = 3) -> int:
    """Samples of x one output sample sees: 1 + (kernel - 1) * sum_i 2^(i mod cycle)."""
    return 1 + (kernel - 1) * sum(2 ** (i % dilation_cycle) for i in range(layers))


def scale_log_mel(mel: torch.Tensor) -> torch.Tensor:
    """A log-mel spectrogram (natural log floored at LOG_FLOOR) -> 1 - log(mel) / log(LOG_FLOOR): 0 at the
    floor (-100 dB), 1 at magnitude 1; the conditioner's input scale (Kong et al.'s code: (dB + 100) / 100)."""
    return 1.0 - mel / math.log(LOG_FLOOR)


class MelUpsampler(nn.Module):
    """(B, M, frames) log-mel -> (B, M, frames * prod(strides)): transposed 2-D convolutions over (bands, time)
    of the scaled spectrogram (:func:`scale_log_mel`)."""

    def __init__(self, strides: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.ConvTranspose2d(1, 1, (3, 2 * s), stride=(1, s), padding=(1, s // 2))
                                   for s in strides)
        self.strides = tuple(int(s) for s in strides)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # each stage: (frames - 1) s - 2 (s // 2) + 2 s = frames * s samples (+1 for an odd s, cut below)
        h = scale_log_mel(mel)[:, None]
        for conv, s in zip(self.convs, self.strides):
            frames = h.shape[-1]
            h = F.leaky_relu(conv(h)[..., : frames * s], LEAKY_SLOPE)  # odd strides give one sample more: cut
        return h[:, 0]


class ResidualLayer(nn.Module):
    """One residual layer of Kong et al. 2021, Fig. 2: (h, step, global, local) -> ((h + residual) / sqrt 2, skip)."""

    def __init__(self, channels: int, dilation: int, embed_dim: int, label_dim: Optional[int],
                 mel_channels: Optional[int]):
        super().__init__()
        self.step_proj = nn.Linear(embed_dim, channels)
        self.dilated_conv = nn.Conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.label_proj = nn.Conv1d(label_dim, 2 * channels, 1, bias=False) if label_dim else None
        self.mel_proj = nn.Conv1d(mel_channels, 2 * channels, 1) if mel_channels else None
        if self.mel_proj is not None:  # zero: a fresh local conditioner adds nothing (it learns from the first step)
            nn.init.zeros_(self.mel_proj.weight)
            nn.init.zeros_(self.mel_proj.bias)
        self.out_proj = nn.Conv1d(channels, 2 * channels, 1)

    def forward(self, h: torch.Tensor, step: torch.Tensor, label: Optional[torch.Tensor],
                mel: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.dilated_conv(h + self.step_proj(step)[:, :, None])
        if label is not None:
            a = a + self.label_proj(label[:, :, None])
        if mel is not None:
            a = a + self.mel_proj(mel)
        filt, gate = a.chunk(2, dim=1)
        residual, skip = self.out_proj(torch.tanh(filt) * torch.sigmoid(gate)).chunk(2, dim=1)
        return (h + residual) / math.sqrt(2.0), skip


class DiffWave(nn.Module):
    """``forward(x (B, C, L), t (B,) or scalar, y (B,) or None, cond (B, mel_channels, frames) or None)``
    -> (B, out_channels, L).  See the module docstring for the layout."""

    def __init__(self, in_channels: int = 1, out_channels: Optional[int] = None, layers: int = 30,
                 channels: int = 64, dilation_cycle: int = 10, embed_dim: int = 512,
                 num_classes: Optional[int] = None, label_dim: int = 128, mel_channels: Optional[int] = None,
                 upsample: Sequence[int] = (16, 16)):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels or in_channels)
        self.num_classes, self.mel_channels = num_classes, mel_channels
        self.layers, self.dilation_cycle = int(layers), int(dilation_cycle)
        self.hop = math.prod(upsample)
        self.input_proj = nn.Conv1d(in_channels, channels, 1)
        self.step_embed = nn.Sequential(nn.Linear(STEP_ENCODING, embed_dim), nn.SiLU(),
                                        nn.Linear(embed_dim, embed_dim), nn.SiLU())
        # the "no label" row num_classes stays zero (padding_idx): a dropped label adds nothing
        self.label_embed = nn.Embedding(num_classes + 1, label_dim, padding_idx=num_classes) if num_classes else None
        self.upsampler = MelUpsampler(upsample) if mel_channels else None
        self.residual_layers = nn.ModuleList(
            ResidualLayer(channels, 2 ** (i % dilation_cycle), embed_dim, label_dim if num_classes else None,
                          mel_channels) for i in range(layers))
        self.skip_proj = nn.Conv1d(channels, channels, 1)
        self.output_proj = nn.Conv1d(channels, self.out_channels, 1)
        nn.init.zeros_(self.output_proj.weight)  # the network starts by predicting 0 (as Kong et al.'s code)
        nn.init.zeros_(self.output_proj.bias)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.layers, self.dilation_cycle)

    def _local(self, cond: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        """The mel spectrogram upsampled to x's length (B, mel_channels, L), or None without a local conditioner."""
        if self.upsampler is None:
            if cond is not None:
                raise ValueError(f"this DiffWave takes no local condition (built without mel_channels), got cond of "
                                 f"type {type(cond).__name__}")
            return None
        b, length = x.shape[0], x.shape[-1]
        if cond is None or cond.dim() != 3 or cond.shape[:2] != (b, self.mel_channels) \
                or cond.shape[-1] * self.hop < length:
            got = "None" if cond is None else tuple(cond.shape)
            raise ValueError(f"this DiffWave is conditioned on a mel spectrogram: cond must be (B={b}, "
                             f"{self.mel_channels}, frames) with frames * {self.hop} >= L={length}, got {got}")
        return self.upsampler(cond.to(x.dtype))[..., :length]

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiffWave expects x of shape (B, {self.in_channels}, L), got {tuple(x.shape)}")
        b = x.shape[0]
        step = self.step_embed(step_encoding(batch_timesteps(t, b, x.device)).to(x.dtype))
        label = None
        if self.label_embed is not None or y is not None:  # y None: the zero "no label" row
            label = add_class_embedding(x.new_zeros(b, self.label_embed.embedding_dim if self.label_embed else 1),
                                        self.label_embed, self.num_classes, y)
        mel = self._local(cond, x)
        h = F.relu(self.input_proj(x))
        skips = 0
        for layer in self.residual_layers:
            h, skip = layer(h, step, label, mel)
            skips = skips + skip
        h = F.relu(self.skip_proj(skips / math.sqrt(len(self.residual_layers))))
        return self.output_proj(h)
