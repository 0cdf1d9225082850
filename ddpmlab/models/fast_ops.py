"""CPU fast paths of three UNet operations, each written beside the plain form it equals.

    plain_dropout          fast_dropout / FastDropout      masks cut from 64-bit random integers
    plain_attention        matmul_attention / attention    two matrix products instead of SDPA
    plain_upsample_conv    subpixel_upsample_conv          nearest x2 + 3x3 conv as four 2x2 convs
                           / upsample_conv

Each dispatcher (``FastDropout``, ``attention``, ``upsample_conv``) takes the fast form only on
CPU tensors, where it was measured to be faster, and the plain form everywhere else.  The
measurements (script, commit, CPU) are on the benchmarks page of the docs (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "plain_dropout", "fast_dropout", "cpu_dropout_mask", "FastDropout",
    "plain_attention", "matmul_attention", "attention",
    "plain_upsample_conv", "subpixel_kernels", "subpixel_upsample_conv", "uses_subpixel", "upsample_conv",
]

# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

DROPOUT_LEVELS = 2**16  # the keep-mask compares 16-bit random integers with a threshold


def plain_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """torch's dropout: zero with probability p, scale the rest by 1 / (1 - p); any shape -> same shape."""
    return F.dropout(x, p, training)


def cpu_dropout_mask(shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout multiplier of ``shape`` on the CPU: 0 with probability p, else 1 / (1 - p).

    p is rounded to a multiple of 2^-16 (0.1 -> 0.1000061) and the kept units are scaled by
    1 / (1 - rounded p), so the output's expectation is exactly the input.  Four 16-bit draws
    come from each 64-bit random integer of torch's generator.
    """
    n = math.prod(shape)
    dropped = round(p * DROPOUT_LEVELS)  # of the 2^16 equally likely 16-bit values, this many drop the unit
    if dropped >= DROPOUT_LEVELS:
        return torch.zeros(shape, dtype=dtype)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    keep = bits.view(shape) >= dropped - DROPOUT_LEVELS // 2  # int16 is uniform on [-2^15, 2^15)
    return keep.to(dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """:func:`plain_dropout` with the CPU mask of :func:`cpu_dropout_mask`; any shape -> same shape.

    Used when training on a CPU with p > 0; elsewhere (eval, p = 0, GPUs) it is torch's fused
    dropout.  torch draws one random number per element serially; one 64-bit draw gives four
    16-bit ones here, fewer draws than the ``torch.rand``/``bernoulli_`` of nn.Dropout.
    """
    if not training or p == 0 or x.device.type != "cpu":
        return plain_dropout(x, p, training)
    return x * cpu_dropout_mask(x.shape, p, x.dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout computed by :func:`fast_dropout` (same arguments, no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

MATMUL_ATTENTION_MAX_TOKENS = 1024  # beyond, the (N, N) scores get large: use SDPA's memory-efficient kernels


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention: q, k, v (B, heads, N, d) -> (B, heads, N, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matrix products: q, k, v (B, heads, N, d) -> (B, heads, N, d).

    The softmax stays in the scores' dtype (torch's fused kernel accumulates bf16 in float32),
    which saves a cast to float32 and back.
    """
    d = q.shape[-1]
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, dim=-1)  # (B, heads, N, N)
    return torch.matmul(weights, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: q, k, v (B, heads, N, d) -> (B, heads, N, d).

    :func:`matmul_attention` on a CPU with N <= 1024, else :func:`plain_attention`: on a CPU,
    SDPA's flash kernel runs its bf16 products below the GEMM library's speed.
    """
    if q.device.type != "cpu" or q.shape[-2] > MATMUL_ATTENTION_MAX_TOKENS:
        return plain_attention(q, k, v)
    return matmul_attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------------------------

SUBPIXEL_MIN_PIXELS = 256  # below 16x16 sources the four small convs cost more than they save (CPU)


def plain_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 then a 3x3 conv (padding 1): (B, I, H, W) -> (B, O, 2H, 2W).

    weight (O, I, 3, 3), bias (O,).
    """
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels (O, I, 3, 3) of a conv after nearest x2 upsampling -> the 2x2 kernels (4 O, I, 2, 2) on the source.

    Along one axis an even output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = source rows i-1, i, i
    (taps w0 | w1 + w2); an odd row 2i+1 reads source rows i, i, i+1 (taps w0 + w1 | w2).
    Order of the 4 O blocks: parities (row, col) = (0, 0), (0, 1), (1, 0), (1, 1).
    """
    def fold(k: torch.Tensor, dim: int):
        k0, k1, k2 = k.unbind(dim)
        return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)

    return torch.cat([kc for kr in fold(weight, 2) for kc in fold(kr, 3)], 0)


def subpixel_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`plain_upsample_conv` in 16/36 of the multiply-adds: (B, I, H, W) -> (B, O, 2H, 2W).

    An output pixel of parity (a, b) sees only 2 x 2 distinct source pixels, so conv3x3(up2(x))
    is four 2x2 convs of x (kernels from :func:`subpixel_kernels`), interleaved.
    """
    b, _, h, w = x.shape
    co = weight.shape[0]
    # one conv for the four parities on x padded by 1: y[:, (a, c)] at (i + a, j + c) is output (2i + a, 2j + c)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), subpixel_kernels(weight), bias.repeat(4))
    y = y.view(b, 2, 2, co, h + 1, w + 1)
    rows = [torch.stack([y[:, a, c, :, a:a + h, c:c + w] for c in (0, 1)], -1) for a in (0, 1)]  # (B, O, H, W, 2)
    return torch.stack(rows, 3).reshape(b, co, 2 * h, 2 * w)


def uses_subpixel(x: torch.Tensor) -> bool:
    """Whether :func:`upsample_conv` takes the sub-pixel form for x (B, C, H, W): CPU tensors of >= 16x16 pixels."""
    return x.device.type == "cpu" and x.shape[-2] * x.shape[-1] >= SUBPIXEL_MIN_PIXELS


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Nearest x2 then 3x3 conv: (B, I, H, W) -> (B, O, 2H, 2W); the sub-pixel form where :func:`uses_subpixel`.

    The sub-pixel form does 16/36 of the plain form's multiply-adds.  It was measured on CPUs
    only, so other devices keep the plain form.
    """
    if uses_subpixel(x):
        return subpixel_upsample_conv(x, weight, bias)
    return plain_upsample_conv(x, weight, bias)
