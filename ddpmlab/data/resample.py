"""Band-limited resampling of sound in torch: a polyphase windowed-sinc filter.

From rate ``orig`` to rate ``new`` (both reduced by their gcd to p = orig / g, q = new / g), output
sample n lies at input time tau_n = n p / q (in input samples) and is

    y[n] = sum_k x[k] h(tau_n - k),   h(u) = f_c sinc(f_c u) w(u),   |u| <= W / f_c

with f_c = rolloff * min(1, q / p) the cut-off as a fraction of the input's Nyquist frequency (below
both rates' Nyquist: no aliasing when going down), sinc(z) = sin(pi z) / (pi z) and w the Hann window
cos^2(pi f_c u / (2 W)) over W zero crossings each side (Smith, "Digital Audio Resampling", the
bandlimited interpolation of Sec. 3).  Output n = m q + i sees the input at m p + j, so phase i of the
filter is one output channel of a strided 1-D convolution (stride p): q kernels of length p + 2 ceil(W / f_c).
The signal is taken as zero outside its ends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ZERO_CROSSINGS = 16  # W: the filter's zero crossings each side (the longer, the sharper its cut-off)
ROLLOFF = 0.945  # f_c as a fraction of the lower Nyquist frequency: the transition band stays below it


def resampled_length(length: int, orig: int, new: int) -> int:
    """Samples of ``length`` input samples at rate ``orig`` after resampling to ``new``: ceil(length new / orig)."""
    return -(-int(length) * int(new) // int(orig))


def sinc_kernels(orig: int, new: int, zero_crossings: int = ZERO_CROSSINGS, rolloff: float = ROLLOFF,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    """(the q polyphase filters (q, 1, p + 2 pad), pad) of resampling rate ``orig`` to ``new`` (reduced: p, q)."""
    g = math.gcd(int(orig), int(new))
    p, q = int(orig) // g, int(new) // g
    fc = rolloff * min(1.0, q / p)
    pad = math.ceil(zero_crossings / fc)
    j = torch.arange(-pad, p + pad, dtype=torch.float64)  # input offsets m p + j around output m q + i
    tau = torch.arange(q, dtype=torch.float64)[:, None] * p / q  # tau_i = i p / q
    u = tau - j[None, :]
    window = torch.where(u.abs() <= zero_crossings / fc, torch.cos(math.pi * fc * u / (2 * zero_crossings)) ** 2, 0.0)
    h = fc * torch.sinc(fc * u) * window
    return h[:, None, :].to(dtype), pad


def resample(x: torch.Tensor, orig: int, new: int, **kernel_options) -> torch.Tensor:
    """x (..., L) sampled at ``orig`` Hz -> (..., ceil(L new / orig)) at ``new`` Hz; x itself when the rates agree.

    ``kernel_options``: zero_crossings, rolloff of :func:`sinc_kernels`."""
    if int(orig) == int(new):
        return x
    p = int(orig) // math.gcd(int(orig), int(new))  # the stride; the kernels are the q = new / gcd phases
    kernels, pad = sinc_kernels(orig, new, dtype=x.dtype, **kernel_options)
    shape, length = x.shape[:-1], x.shape[-1]
    flat = F.pad(x.reshape(-1, 1, length), (pad, pad + p))
    y = F.conv1d(flat, kernels.to(x.device), stride=p)  # (N, q, m): phase i of output m q + i
    y = y.transpose(1, 2).reshape(len(flat), -1)
    return y[:, : resampled_length(length, orig, new)].reshape(*shape, -1)
