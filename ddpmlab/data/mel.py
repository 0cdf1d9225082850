"""Mel spectrograms in torch: the short-time Fourier transform and Slaney's mel filter bank.

* :func:`stft_magnitude`: |STFT|^power with a periodic Hann window, frames centred on samples k * hop
  (the signal padded by n_fft / 2 each side, with zeros by default): librosa's ``stft`` conventions;
* :func:`mel_filter_bank`: triangular filters equally spaced on the Slaney mel scale (linear below
  1 kHz, logarithmic above; Slaney 1998, Auditory Toolbox), each divided by its width in Hz
  (``norm='slaney'``: constant energy per band), as ``librosa.filters.mel`` builds them;
* :func:`mel_spectrogram` (B, ..., L) -> (B, ..., n_mels, 1 + L // hop) and :func:`log_mel`
  log(max(mel, floor)); :func:`config_mel` with the data section's settings (Kong et al. 2021: 80
  bands, FFT and window 1024, hop 256).

The tests hold them to librosa's within 1e-5 in float64; librosa itself is never imported here.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

# Slaney's mel scale: 3 mels per 200 Hz up to 1 kHz (15 mels), then log-spaced with 27 mels per factor 6.4
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0
LOG_FLOOR = 1e-5  # log_mel's floor: -11.5, about 100 dB below a full-scale sine's bands


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Hz -> Slaney mels: f / (200/3) below 1 kHz, 15 + 27 log(f / 1000) / log(6.4) above."""
    f = torch.as_tensor(f, dtype=torch.float64)
    linear = f / _F_SP
    log = _MIN_LOG_MEL + torch.log(torch.clamp(f, min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return torch.where(f >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """Slaney mels -> Hz, the inverse of :func:`hz_to_mel`."""
    m = torch.as_tensor(m, dtype=torch.float64)
    linear = m * _F_SP
    log = _MIN_LOG_HZ * torch.exp(_LOGSTEP * (torch.clamp(m, min=_MIN_LOG_MEL) - _MIN_LOG_MEL))
    return torch.where(m >= _MIN_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=16)
def _filter_bank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    bins = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)  # the STFT's frequencies
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))  # n_mels triangles: left edge, centre, right edge
    width = edges[1:] - edges[:-1]
    rising = (bins[None, :] - edges[:-2, None]) / width[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / width[1:, None]
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # Slaney's area normalisation


def mel_filter_bank(sample_rate: int, n_fft: int, n_mels: int = 80, f_min: float = 0.0,
                    f_max: Optional[float] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (n_mels, n_fft // 2 + 1) Slaney-normalised triangular mel filters between f_min and f_max
    (None: the Nyquist frequency sample_rate / 2), computed in float64 and cast to ``dtype``."""
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(f"mel bands need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2:g} Hz, "
                         f"got f_min={f_min:g}, f_max={f_max:g}")
    return _filter_bank(int(sample_rate), int(n_fft), int(n_mels), float(f_min), f_max).to(dtype, copy=True)


def stft_magnitude(x: torch.Tensor, n_fft: int, hop_length: int, win_length: Optional[int] = None,
                   power: float = 1.0, pad_mode: str = "constant") -> torch.Tensor:
    """|STFT(x)|^power: x (..., L) -> (..., n_fft // 2 + 1, 1 + L // hop_length); periodic Hann window of
    ``win_length`` (default n_fft) centred in the n_fft frame, frame k centred on sample k * hop_length."""
    win_length = win_length or n_fft
    shape, length = x.shape[:-1], x.shape[-1]
    window = torch.hann_window(win_length, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(x.reshape(-1, length), n_fft, hop_length, win_length, window, center=True,
                      pad_mode=pad_mode, return_complex=True)
    return spec.abs().pow(power).reshape(*shape, *spec.shape[-2:])


def mel_spectrogram(x: torch.Tensor, sample_rate: int, n_fft: int = 1024, hop_length: int = 256,
                    n_mels: int = 80, f_min: float = 0.0, f_max: Optional[float] = None,
                    win_length: Optional[int] = None, power: float = 1.0) -> torch.Tensor:
    """The mel spectrogram of x (..., L): (..., n_mels, 1 + L // hop_length); power 1 magnitudes, 2 energies."""
    spec = stft_magnitude(x, n_fft, hop_length, win_length, power)
    bank = mel_filter_bank(sample_rate, n_fft, n_mels, f_min, f_max, dtype=x.dtype).to(x.device)
    return torch.matmul(bank, spec)


def log_mel(mel: torch.Tensor, floor: float = LOG_FLOOR) -> torch.Tensor:
    """log(max(mel, floor)): the natural log, floored so that silence stays finite."""
    return torch.log(torch.clamp(mel, min=floor))


def config_mel(x: torch.Tensor, data) -> torch.Tensor:
    """The log-mel spectrogram of x (..., L) with the data section's settings (data.sample_rate, n_fft,
    hop_length, n_mels, f_min, f_max): (..., n_mels, 1 + L // hop_length)."""
    mel = mel_spectrogram(x, data.sample_rate, data.n_fft, data.hop_length, data.n_mels, data.f_min, data.f_max)
    return log_mel(mel)
