"""The config's sections of a run that adapts another: fine-tuning, LoRA, textual inversion, DreamBooth
(``finetune``, ``lora``) and ControlNet (``controlnet``); re-exported by :mod:`ddpmlab.config.sections`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class FinetuneConfig:
    """A run that starts from another run's (or a diffusers UNet2DModel folder's) weights (ddpm finetune)."""

    # the run or diffusers folder whose EMA weights start this run (set by ddpm finetune); null: no fine-tuning
    source: Optional[str] = None
    # full: every weight trains | lora: only low-rank adapters of the layers lora.* names (Hu et al. 2022), the
    # source's weights frozen; RUN/adapter.safetensors then holds the adapters alone | textual-inversion (a text
    # run): only the embedding of a new token, finetune.token (Gal et al. 2022) | dreambooth (a text run): the
    # whole denoiser (or its LoRA adapters) on a few images of a subject, with prior preservation (Ruiz et al. 2023)
    method: str = "full"
    # textual-inversion: the new token the concept is learned as (e.g. "<concept>"), added to the text encoder's
    # vocabulary | dreambooth: the rare identifier that names the subject (Ruiz et al. 2023, Sec. 4.2: "sks")
    token: Optional[str] = None
    init_token: Optional[str] = None  # textual-inversion: the word whose embedding the new one starts from
    class_word: Optional[str] = None  # dreambooth: the subject's class noun; captions name it "<token> <class_word>"
    # the few images' captions, "{}" standing for the concept (the token; dreambooth: "token class_word"); null:
    # Gal et al. 2022's "a photo of a {}" list (textual-inversion), ["a {}"] (dreambooth, Ruiz et al. 2023)
    templates: Optional[list] = None
    # the phrases that name the concept in the data's own captions (e.g. [red square, square in red]): set, each
    # image keeps its captions with them replaced by the concept (finetune.templates unused)
    replace: Optional[list] = None
    class_images: int = 100  # dreambooth: class images SRC draws first for prior preservation (0: none)
    prior_weight: float = 1.0  # dreambooth: lambda of the prior-preservation loss (Ruiz et al. 2023, Eq. 2)
    lora: bool = False  # dreambooth: train LoRA adapters (lora.*) instead of every weight


@dataclass
class LoRAConfig:
    """The low-rank adapters of finetune.method=lora (Hu et al. 2022): each adapted weight W_0 becomes
    W_0 + (alpha / rank) B A with A (rank, in) and B (out, rank); B starts at zero, so the fine-tuning starts
    from the source's outputs exactly."""

    rank: int = 4  # r, the rank of the update B A (diffusers' LoRA training scripts: 4)
    alpha: float = 4.0  # the update is scaled by alpha / rank (Hu et al. 2022, Sec. 4.1); alpha = rank: by 1
    dropout: float = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    # the layers that get adapters, by the last part of their module name; null: the attention projections
    # (the UNet's attention blocks: qkv, proj_out; its transformer blocks: to_q, to_k, to_v, to_out, proj_out).
    # The convolutions may be named too: conv1, conv2 (each ResBlock's 3x3), shortcut, conv_in, conv_out
    target_modules: Optional[list] = None


@dataclass
class ControlNetConfig:
    """A ControlNet (Zhang et al. 2023) on a frozen UNet run: ddpm train-controlnet (ddpmlab.data.control)."""

    base: Optional[str] = None  # the UNet run it steers (its EMA weights, frozen); set by ddpm train-controlnet
    # each image's control: edges | mask | scribble | blur computed from it, or null: its picture in control_path
    detector: Optional[str] = "edges"
    control_path: Optional[str] = None  # detector null: the pictures' folder (null: control/ beside data.path)
    edge_threshold: float = 0.2  # edges, scribble: the Sobel gradient magnitude (luminance in [0, 1]) of an edge
    mask_threshold: float = 0.5  # mask: the luminance (in [0, 1]) above which a pixel is 1
    blur_sigma: float = 2.0  # blur: the Gaussian's standard deviation in pixels
    scribble_keep: float = 0.5  # scribble: the share of 4x4-pixel cells whose edges it keeps (then 3 px wide)
    label_dropout: float = 0.5  # labels dropped to "no label" (Zhang et al. 2023, Sec. 3.3: 50 % of prompts emptied)
    control_channels: Optional[int] = None  # the control image's channels; null: data.channels
    # the hint encoder's widths (a stride-2 step per entry after the first); null: (16, 32, 96, 256) cut to bring a
    # control of the image's size to the denoiser's (one entry for a pixel run)
    hint_channels: Optional[list] = None
