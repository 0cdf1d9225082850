"""How close a re-synthesised recording is to the original, and the baseline a vocoder must beat.

* :func:`mr_stft_distance`: the multi-resolution STFT distance of Yamamoto et al. 2020 (Parallel
  WaveGAN, Sec. 2.3, Eqs. 3-5): per resolution the spectral convergence || |S| - |S'| ||_F / || |S| ||_F
  plus the mean absolute difference of log magnitudes, averaged over their three resolutions
  (FFT size, window, hop) = (512, 240, 50), (1024, 600, 120), (2048, 1200, 240) (Table 1, stated in
  samples; at 16 kHz they span 15 to 75 ms windows).  Magnitudes are floored at 1e-7 before the log,
  frames centred with zero padding.  0 for identical signals; it grows with any difference.
* :func:`mel_cepstra` and :func:`mel_cepstral_distortion` (Kubichek 1993): cepstra of the log-mel
  magnitude spectrum (data.mel's bands, natural log floored at 1e-5), c_d = DCT-II(ln mel)_d / K for K bands
  (the real cepstrum's scale: ln|X| = c_0 + 2 sum_d c_d cos(d w) on the mel-warped axis), d = 1 .. 24
  (c_0, the level, excluded; order 24 as speech-synthesis papers' mel-cepstra, fewer for fewer bands); per frame
  MCD = 10 / ln 10 * sqrt(2 sum_d (c_d - c'_d)^2) dB, averaged over all frames, which are compared in
  place (the re-synthesis is time-aligned; no dynamic time warping).
* :func:`griffin_lim_from_mel`: the baseline: the mel magnitudes back to linear magnitudes by
  non-negative least squares on the filter bank (projected gradient from the clamped pseudo-inverse,
  as librosa's ``mel_to_stft`` solves NNLS), then Griffin & Lim 1984's iterations (phase from the STFT
  of the inverse STFT of the magnitudes with the last phase) with the momentum 0.99 of Perraudin et al.
  2013 (librosa's default), from random phases, 32 iterations.
* :func:`real_time_factor`: seconds of computing per second of sound (below 1: faster than real time).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ddpmlab.data.mel import LOG_FLOOR, log_mel, mel_filter_bank, mel_spectrogram, stft_magnitude

# Yamamoto et al. 2020, Table 1: (FFT size, window length, hop) of the multi-resolution STFT loss
MR_STFT_RESOLUTIONS: Tuple[Tuple[int, int, int], ...] = ((512, 240, 50), (1024, 600, 120), (2048, 1200, 240))
MAG_FLOOR = 1e-7  # the magnitude floor before the log (Parallel WaveGAN's code)
MCD_ORDER = 24  # mel-cepstra c_1 .. c_24
GRIFFIN_LIM_ITERATIONS = 32
GRIFFIN_LIM_MOMENTUM = 0.99  # Perraudin et al. 2013's fast Griffin-Lim (librosa's default)
NNLS_ITERATIONS = 200


def _pair(x: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two signals (..., L) of the same shape as float64 (..., L); a one-line error otherwise."""
    if x.shape != ref.shape:
        raise ValueError(f"the two signals differ in shape: {tuple(x.shape)} and {tuple(ref.shape)}")
    return x.double(), ref.double()


def stft_distance(x: torch.Tensor, ref: torch.Tensor, n_fft: int, win_length: int, hop: int) -> torch.Tensor:
    """Yamamoto et al. 2020, Eqs. 3-4 at one resolution: spectral convergence + log-magnitude L1, per signal:
    x, ref (..., L) -> (...)."""
    x, ref = _pair(x, ref)
    s = stft_magnitude(x, n_fft, hop, win_length).clamp(min=MAG_FLOOR)
    r = stft_magnitude(ref, n_fft, hop, win_length).clamp(min=MAG_FLOOR)
    convergence = torch.linalg.vector_norm(r - s, dim=(-2, -1)) / torch.linalg.vector_norm(r, dim=(-2, -1))
    log_l1 = (r.log() - s.log()).abs().mean(dim=(-2, -1))
    return convergence + log_l1


def mr_stft_distance(x: torch.Tensor, ref: torch.Tensor,
                     resolutions: Sequence[Tuple[int, int, int]] = MR_STFT_RESOLUTIONS) -> torch.Tensor:
    """Yamamoto et al. 2020, Eq. 5: the mean over resolutions (n_fft, win_length, hop) of :func:`stft_distance`,
    x, ref (..., L) -> (...); channels of a (C, L) signal are separate signals (average them for one number)."""
    return torch.stack([stft_distance(x, ref, n, w, h) for n, w, h in resolutions]).mean(dim=0)


def _dct_ii(n: int, k: int) -> torch.Tensor:
    """The (n, k) matrix of the unnormalised DCT-II: row d is cos(pi d (j + 1/2) / k), j < k."""
    j = torch.arange(k, dtype=torch.float64)
    return torch.cos(math.pi * torch.arange(n, dtype=torch.float64)[:, None] * (j[None, :] + 0.5) / k)


def mel_cepstra(log_mel_spec: torch.Tensor, order: int = MCD_ORDER) -> torch.Tensor:
    """Cepstra c_0 .. c_order of log-mel magnitude spectra (..., K bands, frames) (natural log), in the real
    cepstrum's scale c_d = (1 / K) sum_j ln mel_j cos(pi d (j + 1/2) / K): (..., order + 1, frames)."""
    k = log_mel_spec.shape[-2]
    if not 1 <= order < k:
        raise ValueError(f"mel-cepstra of order {order} need more than {order} mel bands, got {k}")
    return torch.matmul(_dct_ii(order + 1, k), log_mel_spec.double()) / k


def mel_cepstral_distortion(x: torch.Tensor, ref: torch.Tensor, sample_rate: int, n_fft: int = 1024,
                            hop_length: int = 256, n_mels: int = 80, f_min: float = 0.0,
                            f_max: Optional[float] = None, order: Optional[int] = None) -> torch.Tensor:
    """Kubichek 1993's mel-cepstral distortion in dB, per signal: x, ref (..., L) -> (...), the mean over frames
    of 10 / ln 10 * sqrt(2 sum_{d=1}^{order} (c_d - c'_d)^2) (c_0 excluded; :func:`mel_cepstra`); ``order``
    None: 24, or n_mels - 1 for fewer bands."""
    x, ref = _pair(x, ref)
    order = min(MCD_ORDER, n_mels - 1) if order is None else order
    cepstra = [mel_cepstra(log_mel(mel_spectrogram(s, sample_rate, n_fft, hop_length, n_mels, f_min, f_max)),
                           order)[..., 1:, :] for s in (x, ref)]
    per_frame = 10.0 / math.log(10.0) * torch.sqrt(2.0 * (cepstra[0] - cepstra[1]).pow(2).sum(dim=-2))
    return per_frame.mean(dim=-1)


def mel_to_linear(mel: torch.Tensor, bank: torch.Tensor, iterations: int = NNLS_ITERATIONS) -> torch.Tensor:
    """Linear magnitudes S >= 0 (..., n_fft // 2 + 1, frames) with bank @ S closest to the mel magnitudes
    ``mel`` (..., n_mels, frames): min ||bank S - mel||^2 subject to S >= 0, by projected gradient with step
    1 / ||bank||_2^2 from the clamped pseudo-inverse solution (float64)."""
    bank, mel = bank.double(), mel.double()
    s = torch.matmul(torch.linalg.pinv(bank), mel).clamp(min=0.0)
    gram, target = bank.T @ bank, torch.matmul(bank.T, mel)
    step = 1.0 / float(torch.linalg.matrix_norm(bank, ord=2)) ** 2
    for _ in range(iterations):
        s = (s - step * (torch.matmul(gram, s) - target)).clamp(min=0.0)
    return s


def griffin_lim(magnitude: torch.Tensor, n_fft: int, hop_length: int, length: int,
                iterations: int = GRIFFIN_LIM_ITERATIONS, momentum: float = GRIFFIN_LIM_MOMENTUM,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A signal (..., length) whose STFT magnitude approaches ``magnitude`` (..., n_fft // 2 + 1, frames) (Griffin
    & Lim 1984; with ``momentum`` > 0 the fast variant of Perraudin et al. 2013), periodic Hann window of n_fft,
    frames centred on samples k * hop_length (data.mel's STFT), from random phases."""
    shape, mag = magnitude.shape[:-2], magnitude.reshape(-1, *magnitude.shape[-2:]).double()
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    angles = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=generator, dtype=torch.float64))
    previous = torch.zeros_like(angles)

    def istft(phases: torch.Tensor) -> torch.Tensor:
        return torch.istft(mag * phases, n_fft, hop_length, window=window, center=True, length=length)

    for _ in range(iterations):
        rebuilt = torch.stft(istft(angles), n_fft, hop_length, window=window, center=True, pad_mode="constant",
                             return_complex=True)
        angles = rebuilt - (momentum / (1.0 + momentum)) * previous  # Perraudin et al. 2013, Alg. 2
        previous = rebuilt
        angles = angles / angles.abs().clamp(min=1e-16)
    return istft(angles).reshape(*shape, length)


def griffin_lim_from_mel(log_mel_spec: torch.Tensor, length: int, data, iterations: int = GRIFFIN_LIM_ITERATIONS,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The Griffin-Lim inversion of log-mel spectrograms (..., n_mels, frames) made with the data section's
    settings (data.mel.config_mel): mel magnitudes exp(log mel) (the floor 1e-5 stays, below hearing),
    linear magnitudes by :func:`mel_to_linear`, then :func:`griffin_lim`: (..., length) float32."""
    bank = mel_filter_bank(data.sample_rate, data.n_fft, data.n_mels, data.f_min, data.f_max, dtype=torch.float64)
    mel = log_mel_spec.double().exp()
    mel = torch.where(mel <= LOG_FLOOR * (1 + 1e-9), torch.zeros_like(mel), mel)  # the floor is silence
    linear = mel_to_linear(mel, bank)
    return griffin_lim(linear, data.n_fft, data.hop_length, length, iterations, generator=generator).float()


def real_time_factor(seconds: float, samples: int, sample_rate: int) -> float:
    """Computing time per second of sound: ``seconds`` spent on ``samples`` samples at ``sample_rate``."""
    return seconds / (samples / sample_rate)
