"""ControlNet (Zhang et al. 2023): a trainable copy of a UNet's encoder half, steered by a control image.

The layout is diffusers' ``ControlNetModel`` (:mod:`ddpmlab.io.diffusers_controlnet` maps it)::

    hint                 the control image's encoder (``ControlNetConditioningEmbedding``): 3x3 conv -> SiLU,
                         then per further entry of ``hint_channels`` 3x3 conv -> SiLU -> stride-2 3x3 conv -> SiLU,
                         and a zero-initialised 3x3 conv to the UNet's base width
    encoder              a copy of the base UNet without its decoder (time and class embeddings, conv_in, down
                         path, middle block), starting from the base's weights
    zero_convs.{k}       one zero-initialised 1x1 conv per skip connection of the UNet (conv_in's first)
    mid_out              a zero-initialised 1x1 conv of the middle block's output

Zhang et al. 2023, Eq. 2: y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2): the copy F(.; Theta_c)
reads h = conv_in(x_t) + hint(c), and the zero convolutions Z of its skips and middle output are added to the frozen
base's skips and middle output (:meth:`ddpmlab.models.unet.UNet.forward`'s ``residuals``).  Every Z starts at zero,
so a fresh ControlNet leaves the base's output exactly as it was, for any control image.

The control image c is (B, control_channels, H * f, W * f) in [0, 1] (as diffusers' ControlNet pipelines feed it),
with f = 2 ** (len(hint_channels) - 1): the hint encoder's stride-2 convolutions bring it to the UNet's size.  For a
latent run (Rombach et al. 2022) f is the autoencoder's factor: the control stays a picture of the images' size,
and the hint encoder brings it down to the latents' (Zhang et al. 2023, Sec. 3.2: 512x512 controls to 64x64).

A text base (a :class:`~ddpmlab.models.text_to_image.TextToImage` whose denoiser is a UNet with cross-attention)
gets a copy that includes the cross-attention blocks and reads the same text condition as the base: the prompts are
encoded once by the base's encoder and given to both (Zhang et al. 2023, Fig. 3: the prompt c_t reaches both).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.config import Config
from ddpmlab.data import data_shape, image_shape
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.models.build import build_model
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_to_image import PromptTokens, TextToImage
from ddpmlab.models.unet import UNet

HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels (Stable Diffusion's ControlNets)
DECODER = ("up.", "norm_out.", "conv_out.")  # the state-dict prefixes of the UNet's half a ControlNet has not


def zero_conv(channels_in: int, channels_out: int, kernel: int = 1) -> nn.Conv2d:
    """A convolution whose weight and bias start at zero (Zhang et al. 2023, Sec. 3.1)."""
    conv = nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """The control image to the UNet's first feature map: (B, C_c, H * f, W * f) -> (B, out, H, W)."""

    def __init__(self, channels_in: int, hint_channels: Sequence[int], channels_out: int):
        super().__init__()
        widths = list(hint_channels)
        self.conv_in = nn.Conv2d(channels_in, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = zero_conv(widths[-1], channels_out, 3)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(c))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


def skip_channels(unet: UNet) -> List[int]:
    """The channels of the UNet's skip connections, in the order its encoder leaves them (conv_in's first)."""
    channels = [unet.conv_in.out_channels]
    for level in unet.down:
        channels += [block.conv2.out_channels for block in level.res]
        if level.downsample is not None:
            channels.append(level.downsample.conv.out_channels)
    return channels


def base_unet(model: nn.Module) -> Optional[UNet]:
    """The UNet a ControlNet copies in ``model``: the model itself, or a TextToImage's denoiser; None for others."""
    if isinstance(model, TextToImage):
        model = model.denoiser
    return model if isinstance(model, UNet) else None


def encoder_copy(unet: UNet) -> UNet:
    """A trainable copy of ``unet`` without its decoder (up path, norm_out, conv_out)."""
    net = copy.deepcopy(unet)
    del net.up, net.norm_out, net.conv_out
    return net.requires_grad_(True)


class ControlNet(nn.Module):
    """forward(x_t (B, C, H, W), t, y, cond, control (B, control_channels, H * f, W * f) in [0, 1]) ->
    ([one residual per skip connection of the base], the middle block's residual).

    Built from the base UNet ``unet`` (its weights are copied; the base itself is not held).  ``hint_channels``:
    the hint encoder's widths, len(hint_channels) - 1 stride-2 steps (one entry: the control has the UNet's size).
    """

    def __init__(self, unet: UNet, control_channels: int, hint_channels: Sequence[int] = HINT_CHANNELS[:1]):
        super().__init__()
        if not isinstance(unet, UNet):
            raise DDPMError(f"a ControlNet copies a UNet's encoder; got a {type(unet).__name__} (model.kind unet only)")
        self.control_channels, self.hint_channels = int(control_channels), tuple(int(c) for c in hint_channels)
        self.factor = 2 ** (len(self.hint_channels) - 1)
        self.num_classes = unet.num_classes
        self.encoder = encoder_copy(unet)
        self.hint = HintEncoder(self.control_channels, self.hint_channels, unet.base_channels)
        self.zero_convs = nn.ModuleList(zero_conv(c, c) for c in skip_channels(unet))
        self.mid_out = zero_conv(unet.mid.res2.conv2.out_channels, unet.mid.res2.conv2.out_channels)

    def control_shape(self, x_shape: Sequence[int]) -> Tuple[int, int, int]:
        """(C, H, W) of the control image for samples x_t of shape (..., H_x, W_x)."""
        return self.control_channels, x_shape[-2] * self.factor, x_shape[-1] * self.factor

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None, cond=None,
                control: Optional[torch.Tensor] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
        want = self.control_shape(x.shape)
        if control is None or tuple(control.shape) != (x.shape[0], *want):
            got = "none" if control is None else f"shape {tuple(control.shape)}"
            raise ValueError(f"the ControlNet takes a control image of shape ({x.shape[0]}, "
                             f"{', '.join(map(str, want))}) for x_t of shape {tuple(x.shape)}; got {got}")
        enc, batch = self.encoder, x.shape[0]
        context, pooled = enc.text_context(cond, batch)
        temb = enc.embed(t, y, batch, x.device, pooled)
        h = enc.conv_in(x) + self.hint(control.to(x.dtype))  # x + Z(c; Theta_z1)
        hs = enc.encode(h, temb, context)
        mid = enc.mid(hs[-1], temb, *context)
        return [z(s) for z, s in zip(self.zero_convs, hs)], self.mid_out(mid)


def control_rows(control: torch.Tensor, batch: int) -> torch.Tensor:
    """Row i of a batch takes control row ``i mod n``: one image for every sample, or one per sample repeated over
    the batch's halves (classifier-free guidance runs its conditional and unconditional halves as one batch)."""
    n = len(control)
    if n == batch:
        return control
    if batch % n:
        raise ValueError(f"{n} control images do not divide a batch of {batch} samples; give one, or one per sample")
    return control[torch.arange(batch, device=control.device) % n]


class ControlledUNet(nn.Module):
    """The frozen base with ControlNets: ``forward(x_t, t, y=None, cond=None)`` like any denoiser.

    ``base``: a UNet, or a TextToImage over one (then ``cond`` is its TextCondition or PromptTokens, encoded here
    once by the base's encoder and read by the base and every ControlNet; ``encode``/``tokenize`` are the base's).
    ``controls``: (ControlNet, control images (1 or n, C, H, W) in [0, 1], scale) each; the residuals of several
    add up, each times its scale (diffusers' ``MultiControlNetModel``).  The control images are plain attributes,
    never in a state dict.
    """

    def __init__(self, base: nn.Module, controls: Sequence[Tuple[nn.Module, torch.Tensor, float]]):
        super().__init__()
        self.unet = base_unet(base)
        if self.unet is None:
            raise DDPMError(f"a ControlNet steers a UNet (or a text run's UNet); got a {type(base).__name__}")
        self.base = base
        self.controlnets = nn.ModuleList(net for net, _, _ in controls)
        self.images = [image for _, image, _ in controls]
        self.scales = [float(scale) for _, _, scale in controls]
        self.num_classes = base.num_classes  # read by classifier-free guidance

    @property
    def text(self) -> Optional[TextToImage]:
        return self.base if isinstance(self.base, TextToImage) else None

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """The text base's encoding of ``prompts`` (:meth:`TextToImage.encode`)."""
        return self._text_base().encode(prompts)

    def tokenize(self, prompts: Sequence[str]) -> PromptTokens:
        return self._text_base().tokenize(prompts)

    def _text_base(self) -> TextToImage:
        if self.text is None:
            raise DDPMError("this ControlNet's base is no text-to-image run: it takes no prompt")
        return self.text

    def residuals(self, x: torch.Tensor, t, y=None, cond=None) -> Optional[tuple]:
        """The scaled residuals of every ControlNet, summed: ([per skip], middle), or None without ControlNets."""
        total = None
        for net, image, scale in zip(self.controlnets, self.images, self.scales):
            skips, mid = net(x, t, y, cond, control_rows(image.to(x.device), x.shape[0]))
            skips, mid = [scale * s for s in skips], scale * mid
            total = (skips, mid) if total is None else ([a + b for a, b in zip(total[0], skips)], total[1] + mid)
        return total

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None, cond=None) -> torch.Tensor:
        text = self.text
        if text is not None:  # as TextToImage.forward: token ids through its encoder, the pooled part fitted
            if cond is None:
                return text(x, t, y, cond)  # its one-line refusal
            if isinstance(cond, PromptTokens):
                cond = text.encoder(cond.ids.to(x.device), cond.mask.to(x.device))
            cond = text.fit(cond)
        return self.unet(x, t, y, cond, residuals=self.residuals(x, t, y, cond))


def check_fits(controlnet: ControlNet, base: UNet, name: str, base_name: str) -> None:
    """Refuse a ControlNet made for another base: the first tensor of the base's encoder half whose shape differs
    from the ControlNet's copy (or that one of them lacks), named with both shapes."""
    ours = {k: tuple(v.shape) for k, v in controlnet.encoder.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in base.state_dict().items() if not k.startswith(DECODER)}
    for key in list(theirs) + [k for k in ours if k not in theirs]:
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            raise DDPMError(f"ControlNet {name} was made for another base than {base_name}: its tensor "
                            f"encoder.{key} has shape {a or 'none'}, the base's {key} {b or 'none'}; train a "
                            f"ControlNet on this base with `ddpm train-controlnet {base_name}`")


def control_settings(cfg: Config) -> Tuple[int, Tuple[int, ...]]:
    """(control channels, hint encoder widths) of ``cfg``'s ControlNet: controlnet.control_channels (default the
    images'), controlnet.hint_channels (default diffusers' widths cut to the steps from the image's size to the
    denoiser's: one entry for a pixel run, four for latents 8x smaller)."""
    (channels, height, _), steps = image_shape(cfg), 0
    while height // 2 ** steps > data_shape(cfg)[1]:
        steps += 1
    hint = cfg.controlnet.hint_channels or list(HINT_CHANNELS[:steps + 1]) + [HINT_CHANNELS[-1]] * (steps - 3)
    if len(hint) != steps + 1:
        raise ConfigError(f"controlnet.hint_channels={list(hint)} halves the control image {len(hint) - 1} times, but "
                          f"the images ({height} high) reach the denoiser {2 ** steps}x smaller; give "
                          f"{steps + 1} widths, e.g. {list(HINT_CHANNELS[:steps + 1])}")
    return cfg.controlnet.control_channels or channels, tuple(hint)


def build_controlnet(cfg: Config, base: Optional[nn.Module] = None) -> ControlNet:
    """The ControlNet of ``cfg``, copied from ``base`` (a UNet or a text run's TextToImage over one; default: an
    untrained UNet of ``cfg``, whose weights a checkpoint then replaces); a base that is no plain UNet is refused in
    one line."""
    base = build_model(cfg) if base is None else base
    unet = base_unet(base)
    if unet is None:
        raise ConfigError(f"a ControlNet copies a plain UNet's encoder; this run's network is a {type(base).__name__} "
                          f"(model.kind {cfg.model.kind}, diffusion.prediction {cfg.diffusion.prediction}, "
                          f"model.condition {cfg.model.condition}); train-controlnet takes UNet runs")
    channels, hint = control_settings(cfg)
    return ControlNet(unet, channels, hint)
