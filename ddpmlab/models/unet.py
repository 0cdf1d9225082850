"""The time-conditioned UNet of Ho et al. 2020 (DDPM), Appendix B.

Same layout as the paper's TensorFlow code and as diffusers' ``UNet2DModel`` built with
``DownBlock2D``/``AttnDownBlock2D`` blocks, ``downsample_padding=0``, ``norm_eps=1e-6``,
``freq_shift=1`` and ``flip_sin_to_cos=False`` (the google/ddpm-* checkpoints):

    time_embed               sinusoidal(t) -> Linear -> SiLU -> Linear      (dim 4 * base)
    class_embed              Embedding(num_classes + 1, 4 * base), optional
    conv_in                  3x3 conv, in_channels -> base
    down[i].res[j]           ResBlock           (j < num_res_blocks)
    down[i].attn[j]          AttnBlock          (levels whose height is in attention_resolutions)
    down[i].downsample       stride-2 3x3 conv  (not on the last level; None there)
    mid.res1, mid.attn, mid.res2
    up[k].res[j]             ResBlock on concat(h, skip)   (j < num_res_blocks + 1;
    up[k].attn[j]            up[k] is level L-1-k, deepest first, as diffusers' up_blocks)
    up[k].upsample           nearest x2 + 3x3 conv (not on level 0; None there)
    norm_out, conv_out       GroupNorm -> SiLU -> 3x3 conv to out_channels
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.errors import ConfigError

NORM_EPS = 1e-6  # as the paper's code (tf.contrib group_norm) and google/ddpm-* configs


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, *, shift: float = 1.0,
                       flip: bool = False) -> torch.Tensor:
    """Transformer sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim).

    [sin(t * w_k), cos(t * w_k)] with w_k = max_period^(-k / (dim/2 - shift)), as in the DDPM code
    (shift=1). ``shift=0`` and ``flip=True`` ([cos, sin]) give the variant of diffusers' defaults.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / max(half - shift, 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip else [torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Dropout(nn.Dropout):
    """nn.Dropout (zero with probability p, scale the rest by 1 / (1 - p)), faster on a CPU.

    On a CPU the keep-mask is cut from 64-bit random integers, four 16-bit draws from each
    (:func:`cpu_dropout_mask`): torch draws one random number per element serially, so this is
    ~3x faster than the ``torch.rand``/``bernoulli_`` of nn.Dropout (whose masks took 4-5 % of a
    bf16 CIFAR-10 training step).  GPUs keep torch's fused dropout kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * cpu_dropout_mask(x.shape, self.p, x.dtype)


DROPOUT_LEVELS = 2**16


def cpu_dropout_mask(shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout multiplier of ``shape``: 0 with probability p, else 1 / (1 - p), from 16-bit random integers.

    p is rounded to a multiple of 2^-16 (0.1 -> 0.1000061) and the kept units are scaled by
    1 / (1 - rounded p), so the output's expectation is exactly the input.
    """
    n = math.prod(shape)
    dropped = round(p * DROPOUT_LEVELS)  # of the 2^16 equally likely 16-bit values, this many drop the unit
    if dropped >= DROPOUT_LEVELS:
        return torch.zeros(shape, dtype=dtype)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    keep = bits.view(shape) >= dropped - DROPOUT_LEVELS // 2  # int16 is uniform on [-2^15, 2^15)
    return keep.to(dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))


def _norm(channels: int, groups: int, eps: float = NORM_EPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """Wide-ResNet block with a time-embedding bias: (B, in_ch, H, W), (B, temb) -> (B, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int, eps: float = NORM_EPS):
        super().__init__()
        self.norm1 = _norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch, groups, eps)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # timestep information enters as a bias
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Residual multi-head self-attention over the H*W positions: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_heads: int, groups: int, eps: float = NORM_EPS):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, groups, eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # rows: [q; k; v], each (C, C)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).view(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (B, heads, HW, d)
        out = self.proj_out(out.transpose(1, 2).reshape(b, -1, c))
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


MATMUL_ATTENTION_MAX_TOKENS = 1024  # beyond, the (N, N) scores get large: use SDPA's memory-efficient kernels


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v: (B, heads, N, d) -> (B, heads, N, d).

    On GPUs and for long sequences: torch's fused scaled_dot_product_attention.  On a CPU with
    N <= 1024 two plain matrix products are faster (2.7x forward + backward in bf16 at N=256,
    d=256 on an AVX512-BF16 CPU; equal in fp32): SDPA's CPU flash kernel runs its bf16 products
    far below the GEMM library's speed.  The softmax stays in the scores' dtype: torch's kernel
    accumulates bf16 in float32 (a cast to float32 and back cost ~1 % of a bf16 CIFAR-10 step).
    """
    n, d = q.shape[-2], q.shape[-1]
    if q.device.type != "cpu" or n > MATMUL_ATTENTION_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, dim=-1)  # (B, heads, N, N)
    return torch.matmul(weights, v)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2).

    padding 0: TF 'SAME' padding (right/bottom by 1), as the paper's code; padding 1: symmetric
    (diffusers' default ``downsample_padding=1``).
    """

    def __init__(self, channels: int, padding: int = 0):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W).

    On large maps the same function is computed in 16/36 of the multiply-adds: an output
    pixel of parity (a, b) sees only 2 x 2 distinct source pixels, so conv3x3(up2(x)) is four
    2x2 convs of x whose kernels sum the 3x3 taps that hit the same source pixel
    (see :func:`subpixel_kernels`), interleaved.  The parameters are the 3x3 conv's either way.
    """

    SUBPIXEL_MIN_PIXELS = 256  # below 16x16 sources the four small convs cost more than they save (CPU)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] * x.shape[-1] < self.SUBPIXEL_MIN_PIXELS:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        b, _, h, w = x.shape
        co = self.conv.out_channels
        # one conv for the four parities on x padded by 1: y[:, (a, b)] at (i + a, j + b) is output (2i + a, 2j + b)
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), subpixel_kernels(self.conv.weight), self.conv.bias.repeat(4))
        y = y.view(b, 2, 2, co, h + 1, w + 1)
        rows = [torch.stack([y[:, a, c, :, a:a + h, c:c + w] for c in (0, 1)], -1) for a in (0, 1)]  # (B, C, H, W, 2)
        return torch.stack(rows, 3).reshape(b, co, 2 * h, 2 * w)


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


class Level(nn.Module):
    """One resolution of the down or up path: ``res``, ``attn`` (empty or one per ResBlock), resampler."""

    def __init__(self, res: list, attn: list, downsample=None, upsample=None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.downsample = downsample
        self.upsample = upsample


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb_dim: int, dropout: float, num_heads: int, groups: int, eps: float = NORM_EPS):
        super().__init__()
        self.res1 = ResBlock(ch, ch, temb_dim, dropout, groups, eps)
        self.attn = AttnBlock(ch, num_heads, groups, eps)
        self.res2 = ResBlock(ch, ch, temb_dim, dropout, groups, eps)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(h, temb)), temb)


def _check_config(base, mults, groups, num_heads, image_size, head_dim=None) -> None:
    levels = len(mults)
    channels = sorted({base} | {base * m for m in mults})
    for c in channels:
        if c % groups:
            g = math.gcd(*channels)
            ok = max(d for d in range(1, min(groups, g) + 1) if g % d == 0)
            raise ConfigError(
                f"model.norm_groups={groups} does not divide the UNet's {c}-channel feature maps "
                f"(model.base_channels={base}, model.channel_mults={list(mults)} give channels {channels}); "
                f"set model.norm_groups to a divisor of {g} (e.g. {ok}) or change model.base_channels"
            )
    for c in channels:
        if head_dim is not None and c % head_dim:
            raise ValueError(f"attention_head_dim={head_dim} does not divide the {c}-channel attention inputs")
        if head_dim is None and c % num_heads:
            raise ConfigError(
                f"model.num_heads={num_heads} does not divide the {c}-channel attention inputs; "
                f"choose model.num_heads dividing all of {channels}"
            )
    factor = 2 ** (levels - 1)
    if any(s % factor for s in image_size):
        h, w = image_size
        max_levels = 1 + min((s & -s).bit_length() - 1 for s in image_size)  # 2-adic valuation
        raise ConfigError(
            f"data.image_size={[h, w]} does not fit model.channel_mults={list(mults)}: {levels} levels "
            f"halve the image {levels - 1} times, so both sides must be multiples of {factor} "
            f"(e.g. {[factor * -(-s // factor) for s in (h, w)]}); with {[h, w]} use at most "
            f"{max_levels} entries in model.channel_mults (e.g. {[1] + [2] * (max_levels - 1)})"
        )


class UNet(nn.Module):
    """DDPM noise-prediction UNet: forward(x (B,C,H,W), t (B,) or scalar, y (B,) or None) -> (B, out_channels, H, W).

    The keyword-only options after ``image_size`` exist to load diffusers ``UNet2DModel``s built
    with other settings (see :mod:`ddpmlab.diffusers_bridge`); their defaults are the paper's.
    ``attention_head_dim`` fixes the width of a head (heads = channels / width) instead of
    the number of heads.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        norm_groups: int = 32,
        num_classes: Optional[int] = None,
        image_size: Union[int, Sequence[int]] = (32, 32),
        *,
        norm_eps: float = NORM_EPS,
        time_shift: float = 1.0,
        time_flip: bool = False,
        downsample_padding: int = 0,
        attention_head_dim: Optional[int] = None,
    ):
        super().__init__()
        image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        _check_config(base_channels, tuple(channel_mults), norm_groups, num_heads, image_size, attention_head_dim)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.num_levels = len(channel_mults)
        self.time_shift, self.time_flip = time_shift, time_flip
        temb_dim = 4 * base_channels
        heads = lambda c: num_heads if attention_head_dim is None else c // attention_head_dim  # noqa: E731
        res = lambda i, o: ResBlock(i, o, temb_dim, dropout, norm_groups, norm_eps)  # noqa: E731
        attn = lambda c: AttnBlock(c, heads(c), norm_groups, norm_eps)  # noqa: E731

        self.time_embed = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        ch, skips, self.down = base_channels, [base_channels], nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            out, use_attn = base_channels * mult, image_size[0] // 2**i in attention_resolutions
            blocks = [res(ch if j == 0 else out, out) for j in range(num_res_blocks)]
            ch = out
            skips += [ch] * num_res_blocks
            last = i == self.num_levels - 1
            self.down.append(Level(blocks, [attn(ch) for _ in blocks] if use_attn else [],
                                   downsample=None if last else Downsample(ch, downsample_padding)))
            skips += [] if last else [ch]

        self.mid = MidBlock(ch, temb_dim, dropout, heads(ch), norm_groups, norm_eps)

        self.up = nn.ModuleList()
        for i in reversed(range(self.num_levels)):
            out, use_attn = base_channels * channel_mults[i], image_size[0] // 2**i in attention_resolutions
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(ch + skips.pop(), out))
                ch = out
            self.up.append(Level(blocks, [attn(ch) for _ in blocks] if use_attn else [],
                                 upsample=Upsample(ch) if i > 0 else None))

        self.norm_out = _norm(ch, norm_groups, norm_eps)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Paper's init: fan-avg uniform (Xavier) weights, zero biases; zero the last layer of each residual branch."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        factor = 2 ** (self.num_levels - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet expects x of shape (B, {self.in_channels}, H, W) with H and W multiples of {factor} "
                f"(built for {self.image_size[0]}x{self.image_size[1]}), got {tuple(x.shape)}"
            )

    def embed(self, t, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """Time (+ class) embedding: (B, 4 * base_channels)."""
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        sinusoid = timestep_embedding(t, self.base_channels, shift=self.time_shift, flip=self.time_flip)
        temb = self.time_embed(sinusoid.to(self.conv_in.weight.dtype))
        if self.class_embed is None:
            if y is not None:
                raise ValueError("class labels y were given but the model was built without model.num_classes")
            return temb
        if y is None:  # all unconditional: the extra "no label" row
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
        return temb + self.class_embed(y.long())

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x)
        temb = self.embed(t, y, x.shape[0], x.device)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = block(h, temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                hs.append(h)
        h = self.mid(h, temb)
        for level in self.up:
            for j, block in enumerate(level.res):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)  # skip connection by concatenation
                if len(level.attn):
                    h = level.attn[j](h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
