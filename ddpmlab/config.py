"""Configuration: dataclasses for every option, YAML in, validated, unknown keys refused.

The dataclass defaults are the values of Ho et al. 2020 (the CIFAR-10 model); the
ready configs in ``ddpmlab/configs/`` (also reachable as ``configs/`` at the
repository root) override them for quick runs.  The seed-003 ``_defaults`` map as:
``channel -> model.base_channels``, ``input_shape -> data.image_size``,
``schedule -> diffusion.schedule``, ``num_timesteps -> diffusion.num_timesteps``,
``schedule_low/high -> diffusion.beta_start/beta_end``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ddpmlab.errors import ConfigError

CONFIG_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | digits | toy | folder
    path: Optional[str] = None  # image folder (dataset=folder)
    image_size: list = field(default_factory=lambda: [32, 32])  # [H, W]; ignored by mnist/digits/toy
    channels: int = 3  # 1 (grayscale), 3 (RGB) or 4 (RGBA) for folders
    toy: str = "swiss_roll"  # swiss_roll | moons | s_curve | ring (dataset=toy)
    toy_samples: int = 10000
    toy_noise: float = 0.0
    split: str = "all"  # all | train | test (bundled MNIST/digits: a fixed 90/10 split)
    num_workers: int = 0


@dataclass
class ModelConfig:
    kind: str = "unet"  # unet | mlp
    base_channels: int = 128
    channel_mults: list = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list = field(default_factory=lambda: [16])  # feature-map heights with attention
    dropout: float = 0.1
    num_heads: int = 1
    norm_groups: int = 32
    num_classes: Optional[int] = None  # class embedding for conditional models
    # MLP (2D toy data)
    hidden: int = 256
    num_layers: int = 4
    time_embed_dim: int = 128


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | sigmoid | tanh | quadratic
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # eps | x0 | v
    loss: str = "l2"  # l2 | l1
    # reverse variance sigma_t^2: beta_t (fixed_large), beta_tilde_t (fixed_small) or learned
    # between the two (learned_range, Nichol & Dhariwal 2021; doubles the model's output)
    variance: str = "fixed_large"
    loss_type: str = "simple"  # simple (L_simple) | hybrid (L_simple + vlb_weight * L_vlb) | vlb
    vlb_weight: float = 0.001  # lambda of the hybrid loss
    min_snr_gamma: Optional[float] = None  # min-SNR-gamma weighting of L_simple (Hang et al. 2023), e.g. 5.0
    t_sampling: str = "uniform"  # uniform | importance (importance: loss_type vlb only)


@dataclass
class TrainConfig:
    steps: int = 800000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_start: int = 0  # first step at which EMA updates (before: EMA copies the weights)
    ema_every: int = 1  # update the EMA every k steps
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    mixed_precision: str = "no"  # no | bf16 (CPU and CUDA) | fp16 (CUDA, with a loss scaler)
    grad_accum_steps: int = 1  # split each process's share of train.batch_size into this many micro-batches
    # CPU (Linux): freed tensor memory stays in the process for the next step instead of going back
    # to the kernel (ddpmlab.training.allocator); 9-16 % faster CPU steps, the process keeps its peak memory
    keep_freed_memory: bool = True
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    save_every: int = 5000
    sample_n: int = 64
    sample_sampler: str = "ddim"
    sample_steps: int = 100
    out_dir: str = "runs"
    name: Optional[str] = None  # run-directory name; default: <dataset>-<timestamp>
    # class-conditional models: P(label -> "no label") per example, so the same network also
    # learns the unconditional model classifier-free guidance needs (Ho & Salimans 2022)
    label_dropout: float = 0.1
    keep_checkpoints: int = 3  # checkpoints kept in RUN/checkpoints (the newest K)
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss/gradient
    # evaluation during training (ddpmlab.evaluate): every eval_every steps (0: never) the EMA
    # model draws eval_n samples; metrics go to RUN/eval.csv and TensorBoard
    eval_every: int = 0
    eval_n: int = 500
    eval_metrics: list = field(default_factory=list)  # empty: fid,kid,is,pr for images, swd,mmd for 2D
    eval_sampler: str = "ddim"
    eval_steps: int = 50
    eval_inception_weights: Optional[str] = None  # FID Inception-v3 weights file; default: the MNIST classifier
    tensorboard: bool = True  # event files in RUN/tensorboard (tensorboard --logdir runs)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.dataset": ("mnist", "digits", "toy", "folder"),
    "data.toy": ("swiss_roll", "moons", "s_curve", "ring"),
    "data.split": ("all", "train", "test"),
    "model.kind": ("unet", "mlp"),
    "diffusion.schedule": ("linear", "cosine", "sigmoid", "tanh", "quadratic"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.loss": ("l2", "l1"),
    "diffusion.variance": ("fixed_large", "fixed_small", "learned_range"),
    "diffusion.loss_type": ("simple", "hybrid", "vlb"),
    "diffusion.t_sampling": ("uniform", "importance"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}
_POSITIVE = (
    "data.toy_samples", "model.base_channels", "model.num_res_blocks", "model.num_heads",
    "model.norm_groups", "model.hidden", "model.num_layers", "model.time_embed_dim",
    "diffusion.num_timesteps", "train.steps", "train.batch_size", "train.ema_every",
    "train.log_every", "train.sample_steps", "train.save_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.grad_accum_steps", "train.eval_n", "train.eval_steps",
)
_NON_NEGATIVE = (
    "data.num_workers", "data.toy_noise", "model.dropout", "train.lr", "train.warmup_steps",
    "train.weight_decay", "train.grad_clip", "train.ema_start", "train.sample_every", "train.sample_n",
    "train.eval_every",
)


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


def _apply(cfg: Config, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    all_keys = [
        f"{s}.{f.name}" for s in ("data", "model", "diffusion", "train")
        for f in dataclasses.fields(type(getattr(cfg, s)))
    ] + ["version"]
    if key == "version":
        cfg.version = _coerce(value, int, key, source)
        return
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections or key not in all_keys:
        raise ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, all_keys)}")
    section = getattr(cfg, parts[0])
    typ = _section_types(type(section))[parts[1]]
    setattr(section, parts[1], _coerce(value, typ, key, source))


def _flatten(d: dict, source: str, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            if k not in ("data", "model", "diffusion", "train"):
                valid = ["data", "model", "diffusion", "train", "version"]
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


def parse_value(text: str) -> Any:
    """Parse the right-hand side of a ``key=value`` override with YAML rules."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        file = resolve_config_path(path)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a mapping of sections (data, model, diffusion, train)")
        for key, value in _flatten(raw, str(file)).items():
            _apply(cfg, key, value, str(file))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=1000")
        key, text = item.split("=", 1)
        _apply(cfg, key.strip(), parse_value(text), "command line")
    sources = ([str(resolve_config_path(path))] if path is not None else []) + (["command line"] if overrides else [])
    validate(cfg, source=" + ".join(sources) or "config")
    return cfg


def config_from_dict(d: dict, source: str = "config") -> Config:
    cfg = Config()
    for key, value in _flatten(d, source).items():
        _apply(cfg, key, value, source)
    validate(cfg, source=source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Check choices, signs and cross-field constraints; raise ConfigError naming the key."""
    if cfg.version != CONFIG_VERSION:
        made_by = "a newer ddpmlab; upgrade ddpmlab" if cfg.version > CONFIG_VERSION else \
            "an older ddpmlab; rewrite it from a bundled config (ddpmlab/configs/*.yaml)"
        raise ConfigError(
            f"{source}: 'version': config version {cfg.version} is not supported by this ddpmlab (it reads "
            f"version {CONFIG_VERSION}); the config was written by {made_by}"
        )
    flat = {f"{s}.{k}": v for s in ("data", "model", "diffusion", "train")
            for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{source}: '{key}' is {flat[key]!r}; choose one of {', '.join(choices)}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {flat[key]}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {flat[key]}")
    d, m, diff, t = cfg.data, cfg.model, cfg.diffusion, cfg.train
    if len(d.image_size) == 1:
        d.image_size = [d.image_size[0], d.image_size[0]]
    if len(d.image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in d.image_size):
        raise ConfigError(f"{source}: 'data.image_size' must be [H, W] with positive integers, got {d.image_size}")
    if d.channels not in (1, 3, 4):
        raise ConfigError(f"{source}: 'data.channels' must be 1, 3 or 4, got {d.channels}")
    if d.dataset == "folder" and not d.path:
        raise ConfigError(f"{source}: 'data.path' is required when data.dataset is 'folder'")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{source}: 'model.dropout' must be in [0, 1), got {m.dropout}")
    if not m.channel_mults or any(not isinstance(c, int) or c <= 0 for c in m.channel_mults):
        raise ConfigError(f"{source}: 'model.channel_mults' must be a list of positive integers")
    if m.num_classes is not None and m.num_classes <= 0:
        raise ConfigError(f"{source}: 'model.num_classes' must be a positive integer or null")
    if m.num_classes and d.dataset == "toy":
        raise ConfigError(f"{source}: 'model.num_classes' is set but 2D toy data has no labels; "
                          "set model.num_classes=null or use labelled data (mnist, digits, class sub-folders)")
    if not 0.0 <= t.label_dropout < 1.0:
        raise ConfigError(f"{source}: 'train.label_dropout' must be in [0, 1), got {t.label_dropout}")
    if not 0.0 < diff.beta_start < diff.beta_end < 1.0:
        raise ConfigError(
            f"{source}: need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
            f"got {diff.beta_start} and {diff.beta_end}"
        )
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"{source}: 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    if t.sample_steps > diff.num_timesteps:
        raise ConfigError(
            f"{source}: 'train.sample_steps' ({t.sample_steps}) exceeds diffusion.num_timesteps "
            f"({diff.num_timesteps})"
        )
    if t.eval_steps > diff.num_timesteps:
        raise ConfigError(f"{source}: 'train.eval_steps' ({t.eval_steps}) exceeds diffusion.num_timesteps "
                          f"({diff.num_timesteps})")
    if any(not isinstance(a, int) or a <= 0 for a in m.attention_resolutions):
        raise ConfigError(f"{source}: 'model.attention_resolutions' must be a list of positive integers "
                          f"(feature-map heights), got {m.attention_resolutions}")
    if len(t.adam_betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                         for b in t.adam_betas):
        raise ConfigError(f"{source}: 'train.adam_betas' must be two numbers in [0, 1)")
    if m.kind == "mlp" and d.dataset != "toy":
        raise ConfigError(f"{source}: model.kind 'mlp' is for 2D toy data; set data.dataset=toy or model.kind=unet")
    if m.kind == "unet" and d.dataset == "toy":
        raise ConfigError(f"{source}: 2D toy data needs model.kind=mlp (the UNet is for images)")
    _validate_likelihood(diff, source)


def _validate_likelihood(diff: DiffusionConfig, source: str) -> None:
    """Cross-checks of the learned-variance / VLB keys (issue 6)."""
    if diff.vlb_weight < 0:
        raise ConfigError(f"{source}: 'diffusion.vlb_weight' must be >= 0, got {diff.vlb_weight}")
    if diff.min_snr_gamma is not None and not diff.min_snr_gamma > 0:
        raise ConfigError(f"{source}: 'diffusion.min_snr_gamma' must be > 0 or null, got {diff.min_snr_gamma}")
    learned = diff.variance == "learned_range"
    if learned and diff.loss_type == "simple":
        raise ConfigError(f"{source}: diffusion.variance=learned_range needs diffusion.loss_type hybrid or vlb "
                          "(L_simple gives the variance no gradient)")
    if diff.loss_type == "hybrid" and not learned:
        raise ConfigError(f"{source}: diffusion.loss_type=hybrid trains only a learned variance; set "
                          "diffusion.variance=learned_range or use loss_type=simple")
    if diff.t_sampling == "importance" and diff.loss_type != "vlb":
        raise ConfigError(f"{source}: diffusion.t_sampling=importance is for loss_type=vlb "
                          f"(got loss_type={diff.loss_type}); use t_sampling=uniform")
    if diff.min_snr_gamma is not None and diff.loss_type == "vlb":
        raise ConfigError(f"{source}: diffusion.min_snr_gamma weights L_simple, which loss_type=vlb does not use; "
                          "set it to null")


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
