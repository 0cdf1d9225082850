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

With ``context_dim`` the UNet cross-attends to text as Stable Diffusion's does (Rombach et al. 2022,
Sec. 3.3; diffusers' ``UNet2DConditionModel``): every attention block, the middle block's
included, is a :class:`~ddpmlab.models.transformer.SpatialTransformer` reading the token embeddings
of ``cond`` (a :class:`~ddpmlab.models.text_condition.TextCondition`); ``pooled_dim`` adds
``pooled_embed`` (Linear -> SiLU -> Linear of the pooled text embedding, SDXL's add-embedding)
to the time embedding.

Dropout, attention and upsampling run through :mod:`ddpmlab.models.fast_ops`, which computes
the same functions faster on a CPU.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpmlab.errors import ConfigError
from ddpmlab.models.fast_ops import FastDropout, attention, upsample_conv
from ddpmlab.models.text_condition import TextCondition, check_text_condition
from ddpmlab.models.transformer import SpatialTransformer

NORM_EPS = 1e-6  # as the paper's code (tf.contrib group_norm) and google/ddpm-* configs


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, *, shift: float = 1.0,
                       flip: bool = False) -> torch.Tensor:
    """Transformer sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim).

    [sin(t * w_k), cos(t * w_k)] with w_k = max_period^(-k / (dim/2 - shift)), as in the DDPM code
    (shift=1). ``shift=0`` and ``flip=True`` ([cos, sin]) give the variant of diffusers' defaults.
    """
    half = dim // 2  # Vaswani et al. 2017, Sec. 3.5, sines and cosines in two halves rather than interleaved
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / max(half - shift, 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip else [torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def batch_timesteps(t, batch: int, device) -> torch.Tensor:
    """``t`` (a scalar or (batch,)) as a (batch,) tensor on ``device``; ValueError for any other shape."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def add_class_embedding(emb: torch.Tensor, class_embed: Optional[nn.Embedding], num_classes: Optional[int],
                        y: Optional[torch.Tensor]) -> torch.Tensor:
    """``emb`` (B, D) plus the class embedding of labels ``y`` (B,); y None on a conditional model is the extra
    "no label" row ``num_classes`` (classifier-free guidance).  Labels for an unconditional model are refused."""
    if class_embed is None:
        if y is not None:
            raise ValueError("class labels y were given but the model was built without model.num_classes")
        return emb
    batch = emb.shape[0]
    if y is None:  # all unconditional: the extra "no label" row
        y = torch.full((batch,), num_classes, dtype=torch.long, device=emb.device)
    elif y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    return emb + class_embed(y.long())


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
        self.dropout = FastDropout(dropout)
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
        out = attention(q, k, v)  # softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1): (B, heads, HW, d)
        out = self.proj_out(out.transpose(1, 2).reshape(b, -1, c))
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


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

    Computed by :func:`ddpmlab.models.fast_ops.upsample_conv` (four 2x2 convs on large CPU maps,
    the same function); the parameters are the 3x3 conv's either way.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv.weight, self.conv.bias)


class Level(nn.Module):
    """One resolution of the down or up path: ``res``, ``attn`` (empty or one per ResBlock), resampler."""

    def __init__(self, res: list, attn: list, downsample=None, upsample=None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.downsample = downsample
        self.upsample = upsample


class MidBlock(nn.Module):
    """ResBlock -> attention -> ResBlock at the lowest resolution: (B, C, H, W), (B, temb) -> (B, C, H, W).

    The attention is an AttnBlock, or a SpatialTransformer taking ``context`` (tokens, mask)."""

    def __init__(self, make: "_Blocks", ch: int):
        super().__init__()
        self.res1 = make.res(ch, ch)
        self.attn = make.attn(ch)
        self.res2 = make.res(ch, ch)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(h, temb), *context), temb)


def _check_norm_groups(channels: list, base: int, mults: tuple, groups: int) -> None:
    for c in channels:
        if c % groups:
            g = math.gcd(*channels)
            ok = max(d for d in range(1, min(groups, g) + 1) if g % d == 0)
            raise ConfigError(
                f"unet.norm_groups={groups} does not divide the UNet's {c}-channel feature maps "
                f"(unet.base_channels={base}, unet.channel_mults={list(mults)} give channels {channels}); "
                f"set unet.norm_groups to a divisor of {g} (e.g. {ok}) or change unet.base_channels"
            )


def _check_heads(channels: list, num_heads: int, head_dim: Optional[int]) -> None:
    for c in channels:
        if head_dim is not None and c % head_dim:
            raise ValueError(f"attention_head_dim={head_dim} does not divide the {c}-channel attention inputs")
        if head_dim is None and c % num_heads:
            raise ConfigError(
                f"unet.num_heads={num_heads} does not divide the {c}-channel attention inputs; "
                f"choose unet.num_heads dividing all of {channels}"
            )


def _check_image_size(mults: tuple, image_size: tuple) -> None:
    levels, factor = len(mults), 2 ** (len(mults) - 1)
    if any(s % factor for s in image_size):
        h, w = image_size
        max_levels = 1 + min((s & -s).bit_length() - 1 for s in image_size)  # 2-adic valuation
        raise ConfigError(
            f"data.image_size={[h, w]} does not fit unet.channel_mults={list(mults)}: {levels} levels "
            f"halve the image {levels - 1} times, so both sides must be multiples of {factor} "
            f"(e.g. {[factor * -(-s // factor) for s in (h, w)]}); with {[h, w]} use at most "
            f"{max_levels} entries in unet.channel_mults (e.g. {[1] + [2] * (max_levels - 1)})"
        )


def level_heights(image_size: Sequence[int], num_levels: int) -> list:
    """Feature-map height of each UNet level, level 0 (full size) first: what attention_resolutions names."""
    return [image_size[0] // 2**i for i in range(num_levels)]


def _check_attention_resolutions(resolutions: Sequence[int], mults: tuple, image_size: tuple) -> None:
    heights = level_heights(image_size, len(mults))
    unknown = [r for r in resolutions if r not in heights]
    if unknown:
        verb = "matches" if len(unknown) == 1 else "match"
        raise ConfigError(
            f"unet.attention_resolutions: {', '.join(map(str, unknown))} {verb} no level of the UNet; "
            f"its levels have feature-map heights {', '.join(map(str, heights))} (data.image_size height "
            f"{image_size[0]}, halved per level of unet.channel_mults={list(mults)}); choose from those, "
            f"or [] for attention in the middle block only"
        )


def _check_config(base, mults, groups, num_heads, image_size, head_dim=None, attention_resolutions=()) -> None:
    """ConfigError naming the config keys when the UNet cannot be built for these settings."""
    channels = sorted({base} | {base * m for m in mults})
    _check_norm_groups(channels, base, mults, groups)
    _check_heads(channels, num_heads, head_dim)
    _check_image_size(mults, image_size)
    _check_attention_resolutions(attention_resolutions, mults, image_size)


class _Blocks:
    """Makes the UNet's ResBlocks, attention blocks and middle block with its shared settings: attention blocks
    are AttnBlocks, or SpatialTransformers of ``depth`` layers when ``context_dim`` (text) is given."""

    def __init__(self, temb_dim: int, dropout: float, groups: int, eps: float, num_heads: int,
                 head_dim: Optional[int], context_dim: Optional[int] = None, depth: int = 1, positions: bool = False):
        self.temb_dim, self.dropout, self.groups, self.eps, self.positions = temb_dim, dropout, groups, eps, positions
        self.num_heads, self.head_dim, self.context_dim, self.depth = num_heads, head_dim, context_dim, depth

    def heads(self, channels: int) -> int:
        return self.num_heads if self.head_dim is None else channels // self.head_dim

    def res(self, in_ch: int, out_ch: int) -> ResBlock:
        return ResBlock(in_ch, out_ch, self.temb_dim, self.dropout, self.groups, self.eps)

    def attn(self, channels: int) -> nn.Module:
        heads = self.heads(channels)
        if self.context_dim is None:
            return AttnBlock(channels, heads, self.groups, self.eps)
        return SpatialTransformer(channels, heads, self.context_dim, self.depth, self.groups, self.positions)

    def mid(self, channels: int) -> MidBlock:
        return MidBlock(self, channels)


def _down_path(make: _Blocks, base: int, widths: list, attn_at: list, num_res_blocks: int,
               padding: int) -> tuple[nn.ModuleList, list]:
    """The encoder levels 0..L-1 and the channels of the skip connections they leave, in order."""
    ch, skips, down = base, [base], nn.ModuleList()  # conv_in's output is the first skip
    for i, out in enumerate(widths):
        blocks = [make.res(ch if j == 0 else out, out) for j in range(num_res_blocks)]
        ch = out
        skips += [ch] * num_res_blocks
        last = i == len(widths) - 1
        down.append(Level(blocks, [make.attn(ch) for _ in blocks] if attn_at[i] else [],
                          downsample=None if last else Downsample(ch, padding)))
        skips += [] if last else [ch]
    return down, skips


def _up_path(make: _Blocks, widths: list, attn_at: list, num_res_blocks: int, skips: list) -> nn.ModuleList:
    """The decoder levels L-1..0, each ResBlock taking one skip (popped from ``skips``, last first)."""
    ch, up = widths[-1], nn.ModuleList()
    for i in reversed(range(len(widths))):
        out = widths[i]
        blocks = [make.res((ch if j == 0 else out) + skips.pop(), out) for j in range(num_res_blocks + 1)]
        ch = out
        up.append(Level(blocks, [make.attn(ch) for _ in blocks] if attn_at[i] else [],
                        upsample=Upsample(ch) if i > 0 else None))
    return up


class UNet(nn.Module):
    """DDPM noise-prediction UNet: forward(x (B,C,H,W), t (B,) or scalar, y (B,) or None, cond=None)
    -> (B, out_channels, H, W).

    The keyword-only options after ``image_size`` exist to load diffusers ``UNet2DModel``s built
    with other settings (see :mod:`ddpmlab.diffusers_bridge`); their defaults are the paper's.
    ``attention_head_dim`` fixes the width of a head (heads = channels / width) instead of
    the number of heads. ``gradient_checkpointing`` recomputes each ResBlock's and attention
    block's activations in the backward pass (training only; same gradients, less memory).
    ``context_dim`` (the token width), ``transformer_depth``, ``pooled_dim`` and ``positions`` (the transformers'
    position embedding): text conditioning (see the module's docstring); it needs ``cond=TextCondition(...)``.
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
        gradient_checkpointing: bool = False,
        context_dim: Optional[int] = None,
        transformer_depth: int = 1,
        pooled_dim: Optional[int] = None,
        positions: bool = False,
    ):
        super().__init__()
        image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        _check_config(base_channels, tuple(channel_mults), norm_groups, num_heads, image_size, attention_head_dim,
                      tuple(attention_resolutions))
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.base_channels = base_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.num_levels = len(channel_mults)
        self.time_shift, self.time_flip, self.gradient_checkpointing = time_shift, time_flip, gradient_checkpointing
        self.context_dim, self.pooled_dim, self.positions = context_dim, pooled_dim, positions
        temb_dim = 4 * base_channels
        make = _Blocks(temb_dim, dropout, norm_groups, norm_eps, num_heads, attention_head_dim, context_dim,
                       transformer_depth, positions)
        widths = [base_channels * m for m in channel_mults]
        attn_at = [h in attention_resolutions for h in level_heights(image_size, self.num_levels)]

        self.time_embed = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        if pooled_dim is not None:  # SDXL's add-embedding of the pooled text embedding
            self.pooled_embed = nn.Sequential(nn.Linear(pooled_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skips = _down_path(make, base_channels, widths, attn_at, num_res_blocks, downsample_padding)
        self.mid = make.mid(widths[-1])
        self.up = _up_path(make, widths, attn_at, num_res_blocks, skips)
        self.norm_out = _norm(widths[0], norm_groups, norm_eps)
        self.conv_out = nn.Conv2d(widths[0], self.out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Paper's init: fan-avg uniform (Xavier) weights, zero biases; zero the last layer of each residual branch."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        zero = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, (AttnBlock, SpatialTransformer))]
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

    def embed(self, t, y: Optional[torch.Tensor], batch: int, device,
              pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Time (+ class) (+ pooled text) embedding: (B, 4 * base_channels)."""
        t = batch_timesteps(t, batch, device)
        sinusoid = timestep_embedding(t, self.base_channels, shift=self.time_shift, flip=self.time_flip)
        temb = self.time_embed(sinusoid.to(self.conv_in.weight.dtype))
        if pooled is not None:
            temb = temb + self.pooled_embed(pooled.to(temb.dtype))
        return add_class_embedding(temb, self.class_embed, self.num_classes, y)

    def text_context(self, cond, batch: int) -> tuple:
        """The text arguments of the attention blocks, (tokens, mask) or (), and the pooled embedding or None."""
        if self.context_dim is None:
            if cond is not None:
                raise ValueError(f"this UNet takes no condition (built without context_dim), got cond of type "
                                 f"{type(cond).__name__}")
            return (), None
        text: TextCondition = check_text_condition(cond, batch, self.context_dim, self.pooled_dim)
        dtype = self.conv_in.weight.dtype
        return (text.tokens.to(dtype), text.mask), text.pooled

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        """block(*args), recomputed in the backward pass when gradient checkpointing is on (training only)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode(self, h: torch.Tensor, temb: torch.Tensor, context: tuple) -> list:
        """The down path from conv_in's output h (B, base, H, W): the skip connections, h first, the deepest last."""
        hs = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = self._run(block, h, temb)
                if len(level.attn):
                    h = self._run(level.attn[j], h, *context)
                hs.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                hs.append(h)
        return hs

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None, cond: Optional[TextCondition] = None,
                residuals: Optional[tuple] = None) -> torch.Tensor:
        """``residuals``: ([one tensor per skip connection], the middle block's), a ControlNet's, added to them."""
        self._check_input(x)
        context, pooled = self.text_context(cond, x.shape[0])
        temb = self.embed(t, y, x.shape[0], x.device, pooled)
        hs = self.encode(self.conv_in(x), temb, context)
        h = self._run(self.mid, hs[-1], temb, *context)
        if residuals is not None:  # Zhang et al. 2023, Eq. 2: the control's zero-convolved features join the decoder
            hs, h = [s + r for s, r in zip(hs, residuals[0], strict=True)], h + residuals[1]
        for level in self.up:
            for j, block in enumerate(level.res):
                h = self._run(block, torch.cat([h, hs.pop()], dim=1), temb)  # skip connection by concatenation
                if len(level.attn):
                    h = self._run(level.attn[j], h, *context)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
