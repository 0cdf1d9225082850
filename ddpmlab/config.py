"""Configuration: dataclasses for every option, YAML in, validated, unknown keys refused.

The dataclass defaults are the values of Ho et al. 2020 (the CIFAR-10 model); the
ready configs in ``ddpmlab/configs/`` (also reachable as ``configs/`` at the
repository root) override them for quick runs.  The defaults of the original
GaussianDiffusion trainer map onto config keys as:
``channel -> unet.base_channels``, ``input_shape -> data.image_size``,
``schedule -> diffusion.schedule``, ``num_timesteps -> diffusion.num_timesteps``,
``schedule_low/high -> diffusion.beta_start/beta_end``.

The valid choices of the diffusion keys are those of the modules that implement them
(:mod:`ddpmlab.diffusion`); :func:`describe_config` lists every key with its type,
default and meaning, :func:`format_config` writes a resolved config as YAML.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ddpmlab.diffusion.objectives import LOSS_TYPES, LOSSES, T_SAMPLING
from ddpmlab.diffusion.process import PREDICTIONS
from ddpmlab.diffusion.reverse import VARIANCES
from ddpmlab.diffusion.schedules import SCHEDULES
from ddpmlab.errors import ConfigError

CONFIG_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "configs"
SECTIONS = ("data", "model", "unet", "dit", "mlp", "diffusion", "train", "autoencoder", "distill")
# keys of an earlier spelling -> their names now (read with a one-line note; runs are saved in the new one)
RENAMED_KEYS = {
    **{f"model.{k}": f"unet.{k}" for k in ("base_channels", "channel_mults", "num_res_blocks",
                                            "attention_resolutions", "dropout", "num_heads", "norm_groups")},
    **{f"model.{k}": f"mlp.{k}" for k in ("hidden", "num_layers", "time_embed_dim")},
    "model.preset": "dit.preset", "model.dit_depth": "dit.depth", "model.dit_hidden": "dit.hidden",
    "model.dit_heads": "dit.heads", "model.patch_size": "dit.patch_size", "model.mlp_ratio": "dit.mlp_ratio",
}
STAGES = ("diffusion", "autoencoder")  # what a run trains: a denoiser (ddpm train) or ddpm train-autoencoder


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | digits | toy | folder
    path: Optional[str] = None  # image folder (dataset=folder)
    image_size: list = field(default_factory=lambda: [32, 32])  # [H, W]; ignored by mnist/digits/toy
    channels: int = 3  # 1 (grayscale), 3 (RGB) or 4 (RGBA) for folders
    toy: str = "swiss_roll"  # swiss_roll | moons | s_curve | ring (dataset=toy)
    toy_samples: int = 10000  # points drawn from the toy distribution
    toy_noise: float = 0.0  # std of Gaussian noise added to the toy points
    split: str = "all"  # all | train | test (bundled MNIST/digits: a fixed 90/10 split)
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    # super-resolution (model.condition=low_res): [H, W] (or one number) of the low-res input, made
    # from each training image on the fly
    low_res: Optional[list] = None
    downsample: str = "area"  # super-resolution: how the low-res input is made: area (block means) | bicubic
    upsample: str = "bicubic"  # super-resolution: how it returns to the image size: bicubic | bilinear | nearest


@dataclass
class ModelConfig:
    """The denoiser: its kind (sized in the section of that name) and what it is conditioned on."""

    kind: str = "unet"  # unet | mlp | dit (diffusion transformer, Peebles & Xie 2023): sized in unet.*, mlp.*, dit.*
    num_classes: Optional[int] = None  # class embedding for conditional models
    # none | low_res: super-resolution, the upsampled low-res image (data.low_res) concatenated to x_t as
    # extra input channels (SR3, Saharia et al. 2021); sample with `ddpm upscale RUN --image low.png`
    condition: str = "none"
    # latent diffusion (Rombach et al. 2022): a run of `ddpm train-autoencoder` or a local diffusers
    # AutoencoderKL folder (e.g. Stable Diffusion's VAE); the denoiser then works on its latents
    autoencoder: Optional[str] = None
    # recompute activations in the backward pass (UNet ResBlocks/attention, DiT blocks):
    # less memory, one more forward pass of each block per training step
    gradient_checkpointing: bool = False


@dataclass
class UNetConfig:
    """The UNet of model.kind=unet (Ho et al. 2020, App. B)."""

    base_channels: int = 128  # channels at full resolution
    channel_mults: list = field(default_factory=lambda: [1, 2, 2, 2])  # per resolution; each after the 1st halves H, W
    num_res_blocks: int = 2  # residual blocks per resolution
    attention_resolutions: list = field(default_factory=lambda: [16])  # feature-map heights with attention
    dropout: float = 0.1  # dropout in the residual blocks
    num_heads: int = 1  # attention heads
    norm_groups: int = 32  # GroupNorm groups


@dataclass
class DiTConfig:
    """The diffusion transformer of model.kind=dit (Peebles & Xie 2023)."""

    # a size of Table 1: DiT-S/2 ... DiT-XL/8 (S, B, L, XL with patch 2, 4 or 8); sets depth, hidden,
    # heads and patch_size (null: give those four keys)
    preset: Optional[str] = None
    depth: Optional[int] = None  # transformer blocks (null: from dit.preset)
    hidden: Optional[int] = None  # token width (null: from dit.preset)
    heads: Optional[int] = None  # attention heads (null: from dit.preset)
    patch_size: Optional[int] = None  # side p of the square patches, H*W/p^2 tokens (null: from dit.preset)
    mlp_ratio: float = 4.0  # MLP width / token width


@dataclass
class MLPConfig:
    """The MLP of model.kind=mlp (2-D toy data)."""

    hidden: int = 256  # hidden width
    num_layers: int = 4  # hidden layers
    time_embed_dim: int = 128  # size of the timestep embedding


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | sigmoid | tanh | quadratic
    num_timesteps: int = 1000  # T, the steps of the forward process
    beta_start: float = 1e-4  # beta_1 (all schedules but cosine)
    beta_end: float = 0.02  # beta_T (all schedules but cosine)
    # eps | x0 | v | edm (the network inside EDM's preconditioning, Karras et al. 2022, with the
    # loss weight 1 / c_out^2 that gives every noise level a unit-variance target)
    prediction: str = "eps"
    sigma_data: float = 0.5  # prediction edm: the data's standard deviation (EDM: 0.5 for images in [-1, 1])
    loss: str = "l2"  # l2 | l1
    # reverse variance sigma_t^2: beta_t (fixed_large), beta_tilde_t (fixed_small) or learned
    # between the two (learned_range, Nichol & Dhariwal 2021; doubles the model's output)
    variance: str = "fixed_large"
    loss_type: str = "simple"  # simple (L_simple) | hybrid (L_simple + vlb_weight * L_vlb) | vlb
    vlb_weight: float = 0.001  # lambda of the hybrid loss
    min_snr_gamma: Optional[float] = None  # min-SNR-gamma weighting of L_simple (Hang et al. 2023), e.g. 5.0
    # uniform | importance (loss_type vlb only) | lognormal: ln sigma_t ~ N(lognormal_mean, lognormal_std^2),
    # the nearest timestep taken (EDM's noise-level distribution, Karras et al. 2022, Sec. 5)
    t_sampling: str = "uniform"
    lognormal_mean: float = -1.2  # t_sampling lognormal: P_mean
    lognormal_std: float = 1.2  # t_sampling lognormal: P_std
    # rescale the betas so that alpha_bar_T = 0 (Lin et al. 2024): needs prediction v or x0
    zero_terminal_snr: bool = False
    # training noise eps + offset_noise * N(0, 1) per image and channel (Guttenberg 2023), e.g. 0.1:
    # lets the model change an image's mean brightness; 0 is the paper's N(0, I)
    offset_noise: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 800000  # optimiser steps
    # wall-clock budget of the whole run in minutes (set-up, training, the sample drawings of
    # train.sample_every and the final one; not train.eval_every), or null: after 40 steps the measured
    # speed fixes train.steps (at most its value above) so the run fits; the fitted steps go to
    # RUN/config.yaml (resume continues them); a faster machine trains longer
    minutes: Optional[float] = None
    batch_size: int = 128  # global batch (all processes together)
    lr: float = 2e-4  # AdamW learning rate after warm-up
    warmup_steps: int = 5000  # linear learning-rate warm-up
    # after the warm-up: constant (Ho et al. 2020), or cosine / linear decay to 0 at train.steps
    lr_schedule: str = "constant"
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW [beta1, beta2]
    grad_clip: float = 1.0  # clip the gradient norm at this value (0: no clipping)
    ema_decay: float = 0.9999  # decay of the EMA of the weights that sampling uses
    ema_start: int = 0  # first step at which EMA updates (before: EMA copies the weights)
    ema_every: int = 1  # update the EMA every k steps
    # power-function EMAs (Karras et al. 2024) of these relative widths, e.g. [0.05, 0.1]: their
    # snapshots (RUN/ema/, every ema_snapshot_every steps; 0: at every checkpoint) let
    # `ddpm ema RUN --sigma-rel S` build the EMA of any width after training
    ema_profiles: list = field(default_factory=list)
    ema_snapshot_every: int = 0
    seed: int = 0  # seeds weights, batches, noise and samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16
    # or AMX), fp32 elsewhere | no (fp32) | bf16 (CPU and CUDA) | fp16 (CUDA, with a loss scaler)
    mixed_precision: str = "auto"
    grad_accum_steps: int = 1  # split each process's share of train.batch_size into this many micro-batches
    # CPU (Linux): freed tensor memory stays in the process for the next step instead of going back
    # to the kernel (ddpmlab.training.allocator): no page faults per step; the process keeps its peak memory
    keep_freed_memory: bool = True
    log_every: int = 50  # steps between rows of RUN/log.csv
    sample_every: int = 0  # steps between sample drawings (0: only at the end)
    save_every: int = 5000  # steps between checkpoints
    sample_n: int = 64  # samples drawn at each sample_every
    sample_sampler: str = "ddim"  # sampler of those samples
    sample_steps: int = 100  # steps of that sampler
    out_dir: str = "runs"  # folder that holds the run directories
    name: Optional[str] = None  # run-directory name; default: <dataset>-<timestamp>
    # class-conditional models: P(label -> "no label") per example, so the same network also
    # learns the unconditional model classifier-free guidance needs (Ho & Salimans 2022)
    label_dropout: float = 0.1
    # class-conditional runs: the guidance scale of the run's samples (training's drawings and
    # evaluations, and the default of `ddpm sample/eval/demo` on the run; --guidance overrides,
    # 0 is the unconditional model); null: conditional samples without guidance (scale 1).
    # Unconditional runs have nothing to guide and ignore it.
    sample_guidance: Optional[float] = None
    keep_checkpoints: int = 3  # checkpoints kept in RUN/checkpoints (the newest K)
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss/gradient
    # evaluation during training (ddpmlab.evaluate): every eval_every steps (0: never) the EMA
    # model draws eval_n samples; metrics go to RUN/eval.csv and TensorBoard
    eval_every: int = 0
    eval_n: int = 500  # samples per evaluation
    eval_metrics: list = field(default_factory=list)  # empty: fid,kid,is,pr for images, swd,mmd for 2D
    eval_sampler: str = "ddim"  # sampler of the evaluation samples
    eval_steps: int = 50  # steps of that sampler
    eval_inception_weights: Optional[str] = None  # FID Inception-v3 weights file; default: the MNIST classifier
    tensorboard: bool = True  # event files in RUN/tensorboard (tensorboard --logdir runs)
    # super-resolution: conditioning augmentation (Ho et al. 2022, Sec. 4.1), Gaussian noise of std
    # s ~ U[0, cond_noise] per image added to the upsampled low-res input in training (0: none)
    cond_noise: float = 0.0


@dataclass
class AutoencoderConfig:
    """The first stage of latent diffusion (ddpm train-autoencoder; Rombach et al. 2022, App. G)."""

    block_out_channels: list = field(default_factory=lambda: [32, 64, 64])  # per level; each after the 1st halves H, W
    latent_channels: int = 4  # channels c of the latent z (B, c, H/f, W/f)
    layers_per_block: int = 1  # residual blocks per level
    norm_groups: int = 32  # GroupNorm groups (must divide every block_out_channels entry)
    loss: str = "l1"  # reconstruction loss: l1 | l2
    # weight of KL(q(z|x) || N(0, I)) summed over latent dims against the reconstruction loss summed
    # over pixels (Rombach et al. 2022 use 1e-6)
    kl_weight: float = 1e-6
    discriminator: bool = False  # add a PatchGAN with hinge loss (Esser et al. 2021)
    disc_start: int = 2000  # first step of the adversarial loss
    disc_weight: float = 0.5  # its weight (times the adaptive weight, when disc_adaptive)
    disc_adaptive: bool = True  # weight ||grad rec|| / ||grad adv|| at the decoder's last layer (Esser et al. Eq. 7)
    disc_channels: int = 64  # PatchGAN channels of the first layer
    disc_layers: int = 3  # PatchGAN stride-2 layers
    holdout: float = 0.05  # fraction of the data held out of training, for the final reconstruction PSNR
    stats_n: int = 4096  # training images encoded at the end for the latent mean / std (the scale factor)


@dataclass
class DistillConfig:
    """A few-step student of a teacher run (ddpm distill; Salimans & Ho 2022, Song et al. 2023)."""

    teacher: Optional[str] = None  # the teacher run folder (set by ddpm distill); null: the run is no student
    method: str = "progressive"  # progressive (Salimans & Ho 2022) | consistency (Song et al. 2023)
    steps: int = 4  # the student's sampling steps (progressive: a power of two, where the halving stops)
    # the student's parameterisation: v | x0 (eps fails at few steps: Salimans & Ho 2022, Sec. 4)
    prediction: str = "v"
    # progressive: the teacher's DDIM steps in the first round (a power of two above distill.steps); rounds halve it
    teacher_steps: int = 64
    # progressive: iterations of each round (the last value repeats); consistency: the first value, in all
    iterations: list = field(default_factory=lambda: [2000])
    batch_size: int = 128  # examples per iteration
    lr: float = 1e-4  # Adam learning rate (constant; progressive: the optimizer restarts each round)
    ema_decay: float = 0.999  # EMA of the student's weights that sampling uses (warm-up min(decay, (1+k)/(10+k)))
    solver: str = "heun"  # consistency: the teacher's ODE step from sigma_n+1 to sigma_n: heun | euler (DDIM)
    target_ema: float = 0.95  # consistency: EMA decay of the target network theta^- (0: the student, stop-gradient)
    n_start: int = 10  # consistency: discretisation N at the start of the curriculum (Song & Dhariwal 2023)
    n_end: int = 80  # consistency: N at its end (N doubles in equal stages)
    # consistency: weight of each pair: inverse_step (1 / (sigma_n+1 - sigma_n), Song & Dhariwal 2023) | uniform
    weighting: str = "inverse_step"
    sigma_data: float = 0.5  # consistency: sigma_data of c_skip (0.5 for images in [-1, 1])
    rho: float = 7.0  # consistency: rho of the Karras noise levels
    huber_c: Optional[float] = None  # consistency: pseudo-Huber c (null: 0.00054 sqrt(d), Song & Dhariwal 2023)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    version: int = CONFIG_VERSION
    stage: str = "diffusion"  # diffusion | autoencoder (written by ddpm train-autoencoder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# super-resolution (model.condition, data.downsample, data.upsample; ddpmlab.models.conditioned)
CONDITIONS = ("none", "low_res")
DOWNSAMPLE_MODES = ("area", "bicubic")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
DATASETS = ("mnist", "digits", "toy", "folder")  # data.dataset (ddpmlab.data.build_dataset)
# distillation (distill.method, distill.prediction, distill.solver; ddpmlab.samplers.student)
DISTILL_METHODS = ("progressive", "consistency")
STUDENT_PREDICTIONS = ("v", "x0")
ODE_SOLVERS = ("heun", "euler")

_CHOICES = {
    "data.dataset": DATASETS,
    "data.toy": ("swiss_roll", "moons", "s_curve", "ring"),
    "data.split": ("all", "train", "test"),
    "model.kind": ("unet", "mlp", "dit"),
    "diffusion.schedule": SCHEDULES,
    "diffusion.prediction": PREDICTIONS,
    "diffusion.loss": LOSSES,
    "diffusion.variance": VARIANCES,
    "diffusion.loss_type": LOSS_TYPES,
    "diffusion.t_sampling": T_SAMPLING,
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "distill.method": DISTILL_METHODS,
    "distill.prediction": STUDENT_PREDICTIONS,
    "distill.solver": ODE_SOLVERS,
    "distill.weighting": ("inverse_step", "uniform"),
    "model.condition": CONDITIONS,
    "data.downsample": DOWNSAMPLE_MODES,
    "data.upsample": UPSAMPLE_MODES,
    "autoencoder.loss": ("l1", "l2"),
}
_POSITIVE = (
    "data.toy_samples", "unet.base_channels", "unet.num_res_blocks", "unet.num_heads",
    "unet.norm_groups", "mlp.hidden", "mlp.num_layers", "mlp.time_embed_dim",
    "diffusion.num_timesteps", "train.steps", "train.batch_size", "train.ema_every",
    "train.log_every", "train.sample_steps", "train.save_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.grad_accum_steps", "train.eval_n", "train.eval_steps",
    "autoencoder.latent_channels", "autoencoder.layers_per_block", "autoencoder.norm_groups",
    "autoencoder.disc_channels", "autoencoder.disc_layers", "autoencoder.stats_n",
)
_NON_NEGATIVE = (
    "data.num_workers", "data.toy_noise", "unet.dropout", "diffusion.offset_noise", "train.lr", "train.warmup_steps",
    "train.weight_decay", "train.grad_clip", "train.ema_start", "train.sample_every", "train.sample_n",
    "train.ema_snapshot_every",
    "train.eval_every", "train.cond_noise",
    "autoencoder.kl_weight", "autoencoder.disc_start", "autoencoder.disc_weight", "autoencoder.holdout",
)

# Peebles & Xie 2023, Table 1: (depth N, hidden size d, heads) of each DiT size; each with patch 2, 4 or 8
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS = {f"DiT-{size}/{p}": dict(depth=n, hidden=d, heads=heads, patch_size=p)
               for size, (n, d, heads) in DIT_SIZES.items() for p in (2, 4, 8)}
_DIT_KEYS = ("depth", "hidden", "heads", "patch_size")


def dit_settings(d: "DiTConfig", source: str = "config") -> dict:
    """The DiT's {depth, hidden, heads, patch_size}: dit.preset's, else the explicit keys."""
    if d.preset is not None:
        if d.preset not in DIT_PRESETS:
            lower = {name.lower(): name for name in DIT_PRESETS}
            close = difflib.get_close_matches(str(d.preset).lower(), list(lower), n=1, cutoff=0.5)
            hint = f"did you mean '{lower[close[0]]}'? " if close else ""
            raise ConfigError(f"{source}: unknown dit.preset {d.preset!r}; {hint}choose one of "
                              f"{', '.join(DIT_PRESETS)}")
        preset = DIT_PRESETS[d.preset]
        clash = [f"dit.{k}={getattr(d, k)}" for k, v in preset.items() if getattr(d, k) not in (None, v)]
        if clash:
            sets = ", ".join(f"dit.{k}={v}" for k, v in preset.items())
            raise ConfigError(f"{source}: dit.preset={d.preset} sets {sets}, but the config also gives "
                              f"{', '.join(clash)}; drop dit.preset to size the DiT by hand, or drop those keys")
        return dict(preset)
    missing = [f"dit.{k}" for k in _DIT_KEYS if getattr(d, k) is None]
    if missing:
        raise ConfigError(f"{source}: model.kind=dit needs dit.preset (one of {', '.join(DIT_PRESETS)}) or all "
                          f"of {', '.join('dit.' + k for k in _DIT_KEYS)}; missing {', '.join(missing)}")
    return {k: getattr(d, k) for k in _DIT_KEYS}


def _validate_dit(cfg: "Config", source: str) -> None:
    """Checks of the dit.* keys (the preset's sizes are resolved where the DiT is built: :func:`dit_settings`)."""
    d = cfg.dit
    if cfg.model.kind != "dit":
        given = [f"dit.{k}" for k in ("preset",) + _DIT_KEYS if getattr(d, k) is not None]
        if given:
            raise ConfigError(f"{source}: {', '.join(given)} {'size' if len(given) > 1 else 'sizes'} a DiT, but "
                              f"model.kind is {cfg.model.kind!r}; set model.kind=dit or drop them")
        return
    if cfg.data.dataset == "toy":
        raise ConfigError(f"{source}: 2D toy data needs model.kind=mlp (the DiT is for images)")
    sizes = dit_settings(d, source)
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: 'dit.{key}' must be a positive integer, got {value!r}")
    if not d.mlp_ratio > 0 or int(sizes["hidden"] * d.mlp_ratio) < 1:
        raise ConfigError(f"{source}: 'dit.mlp_ratio' must be > 0 (4.0 in the paper), got {d.mlp_ratio}")
    hidden, heads = sizes["hidden"], sizes["heads"]
    if hidden % heads:
        ok = [h for h in range(1, min(hidden, 32) + 1) if hidden % h == 0]
        raise ConfigError(f"{source}: dit.heads={heads} does not divide dit.hidden={hidden} (each head "
                          f"takes hidden / heads channels); choose dit.heads among {ok}")
    if hidden % 4:
        raise ConfigError(f"{source}: dit.hidden={hidden} must be a multiple of 4: the 2-D sin-cos position "
                          "embedding gives each image axis hidden / 2 channels of sines and cosines")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Check (and gently convert) ``value`` to the annotated type ``typ``."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(value, inner, key, source)
    if typ is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is False and "no" in _CHOICES.get(key, ()):  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    return value


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_classes() -> dict[str, type]:
    return {s: _section_types(Config)[s] for s in SECTIONS}


def _all_keys() -> list[str]:
    """Every config key, ``section.field``, in declaration order, then ``version``."""
    return [f"{s}.{f.name}" for s, cls in _section_classes().items() for f in dataclasses.fields(cls)] + ["version", "stage"]


SQUARE_KEYS = ("data.image_size", "data.low_res")  # one number n means [n, n]


def _apply(cfg: Config, key: str, value: Any, source: str, renamed: Optional[list] = None) -> None:
    """Set ``key`` (section.field) to ``value``, checked against its type.  A key of an earlier spelling
    (:data:`RENAMED_KEYS`) sets its new name and is appended to ``renamed`` (or noted at once)."""
    if key == "version":
        cfg.version = _coerce(value, int, key, source)
        return
    if key == "stage":
        cfg.stage = _coerce(value, str, key, source)
        return
    if key in RENAMED_KEYS:
        if renamed is None:
            _note_renamed(source, [key])
        else:
            renamed.append(key)
        key = RENAMED_KEYS[key]
    all_keys = _all_keys()
    parts = key.split(".")
    if key not in all_keys:
        raise ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, all_keys)}")
    section = getattr(cfg, parts[0])
    typ = _section_types(type(section))[parts[1]]
    value = _coerce(value, typ, key, source)
    if key in SQUARE_KEYS and isinstance(value, list) and len(value) == 1:
        value = [value[0], value[0]]
    setattr(section, parts[1], value)


def _note_renamed(source: str, keys: list) -> None:
    """One line on stderr: which keys of ``source`` have a new spelling."""
    if keys:
        names = ", ".join(f"{k} -> {RENAMED_KEYS[k]}" for k in keys)
        print(f"note: {source}: keys read under their new names ({names}); write them so to silence this",
              file=sys.stderr)


def _flatten(d: dict, source: str, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            if k not in SECTIONS:
                valid = [*SECTIONS, "version", "stage"]
                raise ConfigError(f"{source}: unknown config section '{k}'{_suggest(k, valid)}")
            flat.update(_flatten(v, source, prefix=f"{k}."))
        else:
            flat[name] = v
    return flat


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config (``mnist``, ``toy2d``, ``cifar10``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_DIR / f"{name_or_path}.yaml"
    if bundled.is_file() and path.suffix == "":
        return bundled
    names = sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config file '{name_or_path}' not found; give a path to a YAML file or one of the "
        f"bundled configs: {', '.join(names)}"
    )


def _yaml_error(source: str, e: yaml.YAMLError, column_offset: int = 0) -> ConfigError:
    """One line: ``source: line L, column C: problem`` (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)  # only MarkedYAMLError has one
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return ConfigError(f"{source}: not valid YAML ({problem})")
    column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
    return ConfigError(f"{source}: line {mark.line + 1}, column {column}: {problem}")


def parse_value(text: str, source: str = "command line", column_offset: int = 0) -> Any:
    """Parse the right-hand side of a ``key=value`` override with YAML rules.

    Text that is not valid YAML raises a :class:`ConfigError` naming ``source`` and the
    column (counted from ``column_offset``, e.g. the length of ``key=``).
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e, column_offset) from None


def _load_file(cfg: Config, file: Path) -> None:
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(str(file), e) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of sections ({', '.join(SECTIONS)})")
    renamed: list = []
    for key, value in _flatten(raw, str(file)).items():
        _apply(cfg, key, value, str(file), renamed)
    _note_renamed(str(file), renamed)


def _apply_override(cfg: Config, item: str, renamed: Optional[list] = None) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=1000")
    key, text = item.split("=", 1)
    value = parse_value(text, f"command line: {item}", column_offset=len(key) + 1)
    _apply(cfg, key.strip(), value, "command line", renamed)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and ``key=value`` overrides."""
    cfg = Config()
    file = resolve_config_path(path) if path is not None else None
    if file is not None:
        _load_file(cfg, file)
    renamed: list = []
    for item in overrides or []:
        _apply_override(cfg, item, renamed)
    _note_renamed("command line", renamed)
    sources = ([str(file)] if file is not None else []) + (["command line"] if overrides else [])
    validate(cfg, source=" + ".join(sources) or "config")
    return cfg


def config_from_dict(d: dict, source: str = "config") -> Config:
    cfg = Config()
    renamed: list = []
    for key, value in _flatten(d, source).items():
        _apply(cfg, key, value, source, renamed)
    _note_renamed(source, renamed)
    validate(cfg, source=source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Check choices, signs and cross-field constraints; raise ConfigError naming the key.  Never changes ``cfg``."""
    if cfg.version != CONFIG_VERSION:
        made_by = "a newer ddpmlab; upgrade ddpmlab" if cfg.version > CONFIG_VERSION else \
            "an older ddpmlab; rewrite it from a bundled config (ddpmlab/configs/*.yaml)"
        raise ConfigError(
            f"{source}: 'version': config version {cfg.version} is not supported by this ddpmlab (it reads "
            f"version {CONFIG_VERSION}); the config was written by {made_by}"
        )
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{source}: '{key}' is {flat[key]!r}; choose one of {', '.join(choices)}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {flat[key]}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {flat[key]}")
    _validate_data_and_model(cfg, source)
    _validate_train(cfg, source)
    _validate_dit(cfg, source)
    _validate_likelihood(cfg.diffusion, source)
    _validate_distill(cfg.distill, cfg.diffusion.num_timesteps, source)
    _validate_condition(cfg, source)
    _validate_autoencoder(cfg, source)


def _validate_data_and_model(cfg: Config, source: str) -> None:
    d, m, u = cfg.data, cfg.model, cfg.unet
    if len(d.image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in d.image_size):
        raise ConfigError(f"{source}: 'data.image_size' must be [H, W] with positive integers (or one number for a "
                          f"square), got {d.image_size}")
    if d.channels not in (1, 3, 4):
        raise ConfigError(f"{source}: 'data.channels' must be 1, 3 or 4, got {d.channels}")
    if d.dataset == "folder" and not d.path:
        raise ConfigError(f"{source}: 'data.path' is required when data.dataset is 'folder'")
    if not 0.0 <= u.dropout < 1.0:
        raise ConfigError(f"{source}: 'unet.dropout' must be in [0, 1), got {u.dropout}")
    if not u.channel_mults or any(not isinstance(c, int) or c <= 0 for c in u.channel_mults):
        raise ConfigError(f"{source}: 'unet.channel_mults' must be a list of positive integers")
    if any(not isinstance(a, int) or a <= 0 for a in u.attention_resolutions):
        raise ConfigError(f"{source}: 'unet.attention_resolutions' must be a list of positive integers "
                          f"(feature-map heights), got {u.attention_resolutions}")
    if m.num_classes is not None and m.num_classes <= 0:
        raise ConfigError(f"{source}: 'model.num_classes' must be a positive integer or null")
    if m.num_classes and d.dataset == "toy":
        raise ConfigError(f"{source}: 'model.num_classes' is set but 2D toy data has no labels; "
                          "set model.num_classes=null or use labelled data (mnist, digits, class sub-folders)")
    if m.kind == "mlp" and d.dataset != "toy":
        raise ConfigError(f"{source}: model.kind 'mlp' is for 2D toy data; set data.dataset=toy or model.kind=unet")
    if m.kind == "unet" and d.dataset == "toy":
        raise ConfigError(f"{source}: 2D toy data needs model.kind=mlp (the UNet is for images)")
    diff = cfg.diffusion
    if not 0.0 < diff.beta_start < diff.beta_end < 1.0:
        raise ConfigError(f"{source}: need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
                          f"got {diff.beta_start} and {diff.beta_end}")


def _validate_train(cfg: Config, source: str) -> None:
    t, m, T = cfg.train, cfg.model, cfg.diffusion.num_timesteps
    if t.minutes is not None and (isinstance(t.minutes, bool) or not isinstance(t.minutes, (int, float))
                                  or not t.minutes > 0):
        raise ConfigError(f"{source}: 'train.minutes' must be a positive number of minutes or null, got {t.minutes}")
    if not 0.0 <= t.label_dropout < 1.0:
        raise ConfigError(f"{source}: 'train.label_dropout' must be in [0, 1), got {t.label_dropout}")
    if t.sample_guidance is not None and (isinstance(t.sample_guidance, bool)
                                          or not isinstance(t.sample_guidance, (int, float)) or t.sample_guidance < 0):
        raise ConfigError(f"{source}: 'train.sample_guidance' must be a guidance scale >= 0 or null, "
                          f"got {t.sample_guidance}")
    if m.num_classes and t.sample_guidance not in (None, 1) and t.label_dropout == 0:
        raise ConfigError(f"{source}: 'train.sample_guidance={t.sample_guidance}' needs the unconditional model "
                          "that label dropout trains; set train.label_dropout=0.1 or train.sample_guidance=null")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"{source}: 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    for key in ("sample_steps", "eval_steps"):
        if getattr(t, key) > T:
            raise ConfigError(f"{source}: 'train.{key}' ({getattr(t, key)}) exceeds diffusion.num_timesteps ({T})")
    if len(t.adam_betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                         for b in t.adam_betas):
        raise ConfigError(f"{source}: 'train.adam_betas' must be two numbers in [0, 1)")
    bad = [s for s in t.ema_profiles if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 0.2886]
    if bad or len(set(t.ema_profiles)) != len(t.ema_profiles):
        raise ConfigError(f"{source}: 'train.ema_profiles' must be distinct relative widths in (0, 0.2886), e.g. "
                          f"[0.05, 0.1]; got {t.ema_profiles}")


def _validate_condition(cfg: Config, source: str) -> None:
    """Cross-checks of super-resolution (model.condition, data.low_res, train.cond_noise; SR3, Saharia et al. 2021)."""
    d, m = cfg.data, cfg.model
    if m.condition == "none":
        return
    if d.dataset == "toy":
        raise ConfigError(f"{source}: model.condition={m.condition} is for images; 2D toy data has no low-res "
                          "version (set model.condition=none)")
    if d.low_res is None:
        raise ConfigError(f"{source}: model.condition=low_res needs 'data.low_res', the size of the low-res input "
                          "(e.g. data.low_res=7 for 7x7 -> 28x28)")
    if len(d.low_res) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in d.low_res):
        raise ConfigError(f"{source}: 'data.low_res' must be [H, W] (or one number) with positive integers, "
                          f"got {d.low_res}")
    if cfg.train.eval_every:
        raise ConfigError(f"{source}: train.eval_every scores unconditional samples; a super-resolution run "
                          "(model.condition=low_res) is scored after training by `ddpm eval RUN` (PSNR, SSIM, "
                          "FID of upscales): set train.eval_every=0")
    if getattr(m, "autoencoder", None):
        raise ConfigError(f"{source}: model.condition=low_res works on pixels; it cannot be combined with latent "
                          "diffusion (model.autoencoder): set one of them")


def _validate_autoencoder(cfg: Config, source: str) -> None:
    """The autoencoder section and model.autoencoder (latent diffusion, Rombach et al. 2022)."""
    a = cfg.autoencoder
    if cfg.stage not in STAGES:
        raise ConfigError(f"{source}: 'stage' is {cfg.stage!r}; choose one of {', '.join(STAGES)}")
    if not a.block_out_channels or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0
                                       for c in a.block_out_channels):
        raise ConfigError(f"{source}: 'autoencoder.block_out_channels' must be a list of positive integers, "
                          f"e.g. [32, 64, 64], got {a.block_out_channels}")
    if not 0.0 <= a.holdout < 1.0:
        raise ConfigError(f"{source}: 'autoencoder.holdout' must be in [0, 1), got {a.holdout}")
    if cfg.data.dataset == "toy" and (cfg.stage == "autoencoder" or cfg.model.autoencoder):
        raise ConfigError(f"{source}: autoencoders are for images; 2D toy data (data.dataset=toy) has none")


def _validate_distill(ds: DistillConfig, T: int, source: str) -> None:
    """Checks of the distill keys (ddpm distill)."""
    for key in ("steps", "teacher_steps", "batch_size", "n_start"):
        value = getattr(ds, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: 'distill.{key}' must be a positive integer, got {value!r}")
    for key in ("lr", "sigma_data", "rho"):
        if not getattr(ds, key) > 0:
            raise ConfigError(f"{source}: 'distill.{key}' must be > 0, got {getattr(ds, key)}")
    for key in ("ema_decay", "target_ema"):
        if not 0.0 <= getattr(ds, key) < 1.0:
            raise ConfigError(f"{source}: 'distill.{key}' must be in [0, 1), got {getattr(ds, key)}")
    if not ds.iterations or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ds.iterations):
        raise ConfigError(f"{source}: 'distill.iterations' must be a list of positive integers (one per round), "
                          f"got {ds.iterations}")
    if ds.huber_c is not None and not ds.huber_c > 0:
        raise ConfigError(f"{source}: 'distill.huber_c' must be > 0 or null, got {ds.huber_c}")
    if ds.n_end < ds.n_start:
        raise ConfigError(f"{source}: 'distill.n_end' ({ds.n_end}) must be >= distill.n_start ({ds.n_start})")
    if ds.method != "progressive" or ds.teacher is None:  # a plain run's defaults fit any T
        return
    for key in ("steps", "teacher_steps"):
        n = getattr(ds, key)
        if n & (n - 1):
            lo = 1 << (n.bit_length() - 1)
            raise ConfigError(f"{source}: progressive distillation halves the steps each round, so 'distill.{key}' "
                              f"must be a power of two; got {n} (try {lo} or {2 * lo})")
    if not ds.steps < ds.teacher_steps <= T:
        raise ConfigError(f"{source}: 'distill.teacher_steps' ({ds.teacher_steps}) must lie above distill.steps "
                          f"({ds.steps}) and at most diffusion.num_timesteps ({T})")


def _validate_likelihood(diff: DiffusionConfig, source: str) -> None:
    """Cross-checks of the learned-variance / VLB keys (Nichol & Dhariwal 2021, Sec. 3.1-3.3)."""
    if diff.vlb_weight < 0:
        raise ConfigError(f"{source}: 'diffusion.vlb_weight' must be >= 0, got {diff.vlb_weight}")
    if diff.min_snr_gamma is not None and not diff.min_snr_gamma > 0:
        raise ConfigError(f"{source}: 'diffusion.min_snr_gamma' must be > 0 or null, got {diff.min_snr_gamma}")
    if diff.zero_terminal_snr and diff.prediction == "eps":
        raise ConfigError(f"{source}: 'diffusion.zero_terminal_snr' needs diffusion.prediction v (or x0): at "
                          "alpha_bar_T = 0 an eps prediction says nothing about x_0 (Lin et al. 2024)")
    learned = diff.variance == "learned_range"
    if learned and diff.loss_type == "simple":
        raise ConfigError(f"{source}: diffusion.variance=learned_range needs diffusion.loss_type hybrid or vlb "
                          "(L_simple gives the variance no gradient)")
    if diff.loss_type == "hybrid" and not learned:
        raise ConfigError(f"{source}: diffusion.loss_type=hybrid trains only a learned variance; set "
                          "diffusion.variance=learned_range or use loss_type=simple")
    if diff.prediction == "edm" and not diff.sigma_data > 0:
        raise ConfigError(f"{source}: 'diffusion.sigma_data' must be > 0, got {diff.sigma_data}")
    if diff.prediction == "edm" and diff.min_snr_gamma is not None:
        raise ConfigError(f"{source}: diffusion.prediction=edm brings its own loss weight (1 / c_out^2); "
                          "set diffusion.min_snr_gamma=null")
    if diff.t_sampling == "lognormal" and not diff.lognormal_std > 0:
        raise ConfigError(f"{source}: 'diffusion.lognormal_std' must be > 0, got {diff.lognormal_std}")
    if diff.t_sampling == "lognormal" and diff.loss_type == "vlb":
        raise ConfigError(f"{source}: diffusion.t_sampling=lognormal reweights L_simple; loss_type=vlb needs "
                          "t_sampling uniform or importance")
    if diff.t_sampling == "importance" and diff.loss_type != "vlb":
        raise ConfigError(f"{source}: diffusion.t_sampling=importance is for loss_type=vlb "
                          f"(got loss_type={diff.loss_type}); use t_sampling=uniform")
    if diff.min_snr_gamma is not None and diff.loss_type == "vlb":
        raise ConfigError(f"{source}: diffusion.min_snr_gamma weights L_simple, which loss_type=vlb does not use; "
                          "set it to null")


def format_config(cfg: Config) -> str:
    """The resolved config as YAML text (what ``save_config`` writes; :func:`load_config` reads it back)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(format_config(cfg))


# ---------------------------------------------------------------- the keys as text

def _field_comments(cls: type) -> dict[str, str]:
    """Each field's ``#`` comments in the class source: the comment-only lines just above it, then its own."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen install): no meanings
        return {}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        first = node.lineno
        while first - 1 in comments and lines[first - 2].lstrip().startswith("#"):
            first -= 1
        texts = [comments[n] for n in range(first, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(texts)
    return out


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return f"{_type_name(inner)}|null"
    return "list" if typing.get_origin(typ) is list else getattr(typ, "__name__", str(typ))


def _yaml_value(value: Any) -> str:
    """A value as one line of YAML flow style: ``[32, 32]``, ``null``, ``true``, ``'no'``."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _describe_rows(cfg: Config) -> list[tuple[str, str, str, str]]:
    """(key, type, value, meaning) of every key of ``cfg``, in declaration order."""
    rows = []
    for section, cls in _section_classes().items():
        meanings, types = _field_comments(cls), _section_types(cls)
        for f in dataclasses.fields(cls):
            value = _yaml_value(getattr(getattr(cfg, section), f.name))
            rows.append((f"{section}.{f.name}", _type_name(types[f.name]), value, meanings.get(f.name, "")))
    version_meaning = f"config format version (this ddpmlab reads {CONFIG_VERSION})"
    return rows + [("version", "int", _yaml_value(cfg.version), version_meaning)]


def describe_config(cfg: Optional[Config] = None) -> str:
    """Every config key, one line each: ``section.key  type  default  meaning``.

    Defaults are those of ``cfg`` (e.g. a bundled config), else the dataclass defaults;
    meanings are the field comments of the dataclasses.
    """
    rows = _describe_rows(cfg if cfg is not None else Config())
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = ("  ".join(r[k].ljust(widths[k]) for k in range(3)) + "  " + r[3] for r in rows)
    return "".join(line.rstrip() + "\n" for line in lines)
