"""Checking a config: choices, signs and cross-field constraints, each error naming the key.  Never changes it."""

from __future__ import annotations

import dataclasses

from ddpmlab.config.audio import validate_audio
from ddpmlab.config.controlnet import validate_controlnet
from ddpmlab.config.finetune import validate_finetune
from ddpmlab.config.presets import preset_values
from ddpmlab.config.sections import (
    CONDITIONS,
    CONFIG_VERSION,
    DATASETS,
    DISTILL_METHODS,
    DOWNSAMPLE_MODES,
    ODE_SOLVERS,
    SECTIONS,
    STAGES,
    STUDENT_PREDICTIONS,
    UPSAMPLE_MODES,
    Config,
    DiffusionConfig,
    DistillConfig,
    DiTConfig,
)
from ddpmlab.config.text import validate_text
from ddpmlab.diffusion.flow import FLOW_T_SAMPLING, MODE_SCALE_RANGE
from ddpmlab.diffusion.objectives import LOSS_TYPES, LOSSES, T_SAMPLING
from ddpmlab.diffusion.process import PREDICTIONS, PROCESSES
from ddpmlab.diffusion.reverse import VARIANCES
from ddpmlab.diffusion.schedules import SCHEDULES
from ddpmlab.errors import ConfigError

CHOICES = {
    "data.dataset": DATASETS,
    "data.toy": ("swiss_roll", "moons", "s_curve", "ring"),
    "data.split": ("all", "train", "test"),
    "model.kind": ("unet", "mlp", "dit", "diffwave"),
    "diffusion.process": PROCESSES,
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
POSITIVE = (
    "data.toy_samples", "unet.base_channels", "unet.num_res_blocks", "unet.num_heads",
    "unet.norm_groups", "unet.transformer_depth", "mlp.hidden", "mlp.num_layers", "mlp.time_embed_dim",
    "diffusion.num_timesteps", "train.steps", "train.batch_size", "train.ema_every",
    "train.log_every", "train.sample_steps", "train.save_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.grad_accum_steps", "train.eval_n", "train.eval_steps",
    "autoencoder.latent_channels", "autoencoder.layers_per_block", "autoencoder.norm_groups",
    "autoencoder.disc_channels", "autoencoder.disc_layers", "autoencoder.stats_n",
)
NON_NEGATIVE = (
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
DIT_KEYS = ("depth", "hidden", "heads", "patch_size")


def dit_settings(d: "DiTConfig", source: str = "config") -> dict:
    """The DiT's {depth, hidden, heads, patch_size}: dit.preset's, else the explicit keys."""
    if d.preset is not None:
        return preset_values("dit", d, DIT_PRESETS, source, "the DiT")
    missing = [f"dit.{k}" for k in DIT_KEYS if getattr(d, k) is None]
    if missing:
        raise ConfigError(f"{source}: model.kind=dit needs dit.preset (one of {', '.join(DIT_PRESETS)}) or all "
                          f"of {', '.join('dit.' + k for k in DIT_KEYS)}; missing {', '.join(missing)}")
    return {k: getattr(d, k) for k in DIT_KEYS}


def _validate_dit(cfg: "Config", source: str) -> None:
    """Checks of the dit.* keys (the preset's sizes are resolved where the DiT is built: :func:`dit_settings`)."""
    d = cfg.dit
    if cfg.model.kind != "dit":
        keys = ("preset",) + DIT_KEYS + ("context_dim", "pooled_dim")
        given = [f"dit.{k}" for k in keys if getattr(d, k) is not None]
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
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{source}: '{key}' is {flat[key]!r}; choose one of {', '.join(choices)}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {flat[key]}")
    _validate_data_and_model(cfg, source)
    validate_audio(cfg, source)  # sound data and DiffWave
    _validate_train(cfg, source)
    _validate_dit(cfg, source)
    _validate_likelihood(cfg.diffusion, source)
    _validate_flow(cfg.diffusion, source)
    _validate_distill(cfg.distill, cfg.diffusion.num_timesteps, source)
    _validate_reflow(cfg, source)
    _validate_condition(cfg, source)
    _validate_autoencoder(cfg, source)
    validate_text(cfg, source)  # text conditioning: text.*, unet/dit.context_dim and pooled_dim
    validate_finetune(cfg, source)  # ddpm finetune: finetune.*, lora.*
    validate_controlnet(cfg, source)  # ddpm train-controlnet: controlnet.*


def _validate_data_and_model(cfg: Config, source: str) -> None:
    d, m, u = cfg.data, cfg.model, cfg.unet
    if len(d.image_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in d.image_size):
        raise ConfigError(f"{source}: 'data.image_size' must be [H, W] with positive integers (or one number for a "
                          f"square), got {d.image_size}")
    if d.channels not in (1, 3, 4) and d.dataset != "audio":  # sound's: config.audio
        raise ConfigError(f"{source}: 'data.channels' must be 1, 3 or 4, got {d.channels}")
    if d.dataset in ("folder", "webdataset") and not d.path:
        raise ConfigError(f"{source}: 'data.path' is required when data.dataset is '{d.dataset}'")
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
    if m.condition != "low_res":  # none, or mel: a vocoder's (config.audio)
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


def _validate_reflow(cfg: Config, source: str) -> None:
    """Checks of the reflow keys (ddpm reflow); the sampler and its steps are checked on the teacher."""
    rf = cfg.reflow
    for key in ("pairs", "chunk", "steps"):
        value = getattr(rf, key)
        if (value is not None or key != "steps") and (isinstance(value, bool) or not isinstance(value, int)
                                                       or value < 1):
            raise ConfigError(f"{source}: 'reflow.{key}' must be a positive integer{' or null' * (key == 'steps')}, "
                              f"got {value!r}")
    if rf.guidance is not None and not rf.guidance >= 0:
        raise ConfigError(f"{source}: 'reflow.guidance' must be a guidance scale >= 0 or null, got {rf.guidance}")
    if rf.teacher is not None and cfg.diffusion.process != "flow":
        raise ConfigError(f"{source}: reflow.teacher is set, so the run is a reflow of a flow run, but "
                          f"diffusion.process is {cfg.diffusion.process!r}; reflow retrains flow runs only")


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


def _validate_flow(diff: DiffusionConfig, source: str) -> None:
    """Cross-checks of diffusion.process=flow (flow matching, :mod:`ddpmlab.diffusion.flow`) against the DDPM keys."""
    if diff.process != "flow":
        if diff.prediction == "velocity":
            raise ConfigError(f"{source}: diffusion.prediction=velocity is the network of a flow: set "
                              "diffusion.process=flow, or a DDPM prediction (eps, x0, v, edm)")
        if diff.t_sampling in FLOW_T_SAMPLING and diff.t_sampling != "uniform":
            raise ConfigError(f"{source}: diffusion.t_sampling={diff.t_sampling} draws the continuous t of a flow; "
                              "set diffusion.process=flow, or t_sampling uniform, importance or lognormal")
        return
    if diff.prediction != "velocity":
        raise ConfigError(f"{source}: diffusion.process=flow trains the velocity eps - x_0: set "
                          f"diffusion.prediction=velocity (got {diff.prediction})")
    if diff.t_sampling not in FLOW_T_SAMPLING:
        raise ConfigError(f"{source}: diffusion.t_sampling={diff.t_sampling} draws DDPM timesteps; a flow takes "
                          f"{', '.join(FLOW_T_SAMPLING)}")
    clash = [f"diffusion.{k}={v}" for k, v, plain in (
        ("loss_type", diff.loss_type, "simple"), ("variance", diff.variance, "fixed_large"),
        ("min_snr_gamma", diff.min_snr_gamma, None), ("zero_terminal_snr", diff.zero_terminal_snr, False))
        if v != plain]
    if clash:
        raise ConfigError(f"{source}: {', '.join(clash)} belong to DDPM runs; a flow trains the plain velocity "
                          "loss (loss_type simple, no variance head, no min-SNR weight; its noise is pure at t = 1): "
                          "drop them")
    if not diff.logit_normal_std > 0:
        raise ConfigError(f"{source}: 'diffusion.logit_normal_std' must be > 0, got {diff.logit_normal_std}")
    lo, hi = MODE_SCALE_RANGE
    if not lo <= diff.mode_scale <= hi:
        raise ConfigError(f"{source}: 'diffusion.mode_scale' must lie in [{lo:g}, {hi:.4f}] (f_mode is then a "
                          f"bijection of [0, 1], Esser et al. 2024, Eq. 20), got {diff.mode_scale}")
    if not diff.flow_shift > 0:
        raise ConfigError(f"{source}: 'diffusion.flow_shift' must be > 0 (1: uniform in t), got {diff.flow_shift}")
