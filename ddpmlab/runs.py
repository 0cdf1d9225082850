"""The run layer: a trained run loaded once, and the one set of rules for sampling from it.

Every front end (the ``ddpm`` command, evaluation, pictures, benchmarks, training's own
sample grids) goes through here, so that they agree on:

* the device (:func:`resolve_device`: ``auto`` picks CUDA, then MPS, then the CPU; a device
  that is not there is refused in one line);
* loading a run (:func:`load_run`: config, weights of the newest loadable checkpoint,
  schedule, sample shape) or a local diffusers folder (:func:`load_diffusers_run`);
* latent runs (``model.autoencoder``, Rombach et al. 2022): the run carries the autoencoder's
  decoder (:func:`load_autoencoder`), so every front end's samples come back as pixels;
* a sampler call (:func:`plan_sampling`: default steps, the run's own reverse variance,
  the step schedule, which options apply to which sampler, class labels and guidance);
* where the results go (:func:`resolve_output`, :func:`write_raw`): the raw samples are
  written before any picture, and ``out`` may be a file or a folder.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ddpmlab.config import Config
from ddpmlab.data import data_shape, image_shape
from ddpmlab.data.latents import LATENTS_FILE, describe_autoencoder, file_sha256
from ddpmlab.diffusion.reverse import variance_name
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.checkpoint import list_checkpoints, load_run_config, newest_weights, require_run_dir
from ddpmlab.io.diffusers_bridge import load_diffusers_model
from ddpmlab.io.weights import load_state_dict_file
from ddpmlab.models import build_model
from ddpmlab.models.autoencoder import LatentCodec, build_autoencoder, load_diffusers_vae
from ddpmlab.models.conditioned import bind_condition
from ddpmlab.samplers.editing import img2img, inpaint
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import conditioning, guided
from ddpmlab.samplers.registry import SamplerSpec, get_spec, timesteps_options
from ddpmlab.samplers.student import check_student_steps

DEVICE_KINDS = ("cpu", "cuda", "mps")
WEIGHTS = ("ema", "model")
RECOMMENDATION_FILE = "recommended_samplers.json"  # RUN/<this>: written by `ddpm bench samplers RUN`


def resolve_device(name: str = "auto", where: str = "device") -> torch.device:
    """``auto`` -> cuda, mps or cpu (what is there); else the named device, refused when absent."""
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{where}: unknown device '{name}'; choose auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(f"{where}: '{name}' but no CUDA GPU is visible (this torch {torch.__version__} is "
                              f"{build}); use auto or cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{where}: '{name}' but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: 'mps' but this machine has no Apple GPU available to torch; use auto or cpu")
    return torch.device(text)


@dataclass
class Run:
    """A denoiser ready to sample: its config, network (eval mode), schedule and device.

    ``dir`` is the run folder (None for a diffusers folder or a model built in memory);
    ``checkpoint`` names what the weights came from.
    """

    cfg: Config
    model: nn.Module
    schedule: NoiseSchedule
    device: torch.device
    dir: Optional[Path] = None
    checkpoint: str = ""
    weights: str = "ema"
    codec: Optional[LatentCodec] = None  # latent runs: the autoencoder (loaded from model.autoencoder when None)

    def __post_init__(self):
        if self.codec is None and self.cfg.model.autoencoder:
            self.codec = load_autoencoder(self.cfg.model.autoencoder, self.device)

    @property
    def shape(self) -> tuple:
        """The shape of one sample the denoiser draws: (C, H, W) for images, (2,) for 2-D points, (c, h, w) latents."""
        return data_shape(self.cfg)

    @property
    def image_shape(self) -> tuple:
        """The shape of one result of :func:`draw_samples`: the pixels a latent run decodes to, else :attr:`shape`."""
        return image_shape(self.cfg)

    @property
    def is_latent(self) -> bool:
        return self.codec is not None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def num_classes(self) -> int:
        return int(self.cfg.model.num_classes or 0)

    @property
    def T(self) -> int:
        return self.schedule.num_timesteps

    @property
    def clip_x0(self) -> Optional[float]:
        """Predicted x0 is clamped to the data range [-1, 1] for images (Ho et al.'s sampler), not for points."""
        return 1.0 if self.is_image and not self.is_latent else None  # latents have no fixed range

    def folder(self, kind: str) -> Path:
        """RUN/<kind> (samples, viz, eval, bench); ./<kind> without a run folder."""
        return (self.dir if self.dir is not None else Path(".")) / kind


def load_run(run_dir, weights: str = "ema", device="auto", weights_file=None, where: str = "--weights") -> Run:
    """The run in ``run_dir`` with its ``weights`` ('ema' or 'model') of the newest loadable checkpoint.

    ``weights_file`` replaces them by a file's (safetensors, or a PyTorch state dict read with
    ``weights_only=True``).  ``device``: a name for :func:`resolve_device` or a torch.device.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"{where}: unknown weights '{weights}'; choose ema or model")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.stage == "autoencoder":
        raise DDPMError(f"'{run_dir}' is an autoencoder run (ddpm train-autoencoder), not a diffusion model; train "
                        f"latent diffusion on it with `ddpm train --config mnist_latent model.autoencoder={run_dir}`")
    _locate_autoencoder(cfg, run_dir)
    model = build_model(cfg)
    if weights_file is None:
        path, state = newest_weights(run_dir, weights, where)
        model.load_state_dict(state)
        source = path.name
    else:
        try:
            model.load_state_dict(load_state_dict_file(weights_file))
        except RuntimeError as e:
            raise DDPMError(f"weights file '{weights_file}' does not fit the model of run '{run_dir}' "
                            f"({' '.join(str(e).split())[:300]})") from None
        source = str(weights_file)
    run = Run(cfg, model.to(device).eval(), NoiseSchedule.from_config(cfg.diffusion), device, run_dir, source,
              weights)
    check_latent_run(run)
    return run


def _locate_autoencoder(cfg: Config, run_dir: Path) -> None:
    """A latent run's model.autoencoder, relative to where it was trained: if it is not found from here,
    the absolute path stored in RUN/latents.json at training time."""
    ae = cfg.model.autoencoder
    stored = Path(run_dir) / LATENTS_FILE
    if not ae or Path(ae).expanduser().exists() or not stored.is_file():
        return
    cfg.model.autoencoder = json.loads(stored.read_text()).get("autoencoder", ae)


_CODECS: Dict[tuple, LatentCodec] = {}


def _codec_key(folder: Path, weights_file: Path, device: torch.device) -> Optional[tuple]:
    if not weights_file.is_file():
        return None
    return (str(folder.resolve()), str(weights_file), weights_file.stat().st_mtime_ns, str(device))


def load_autoencoder(path, device="auto") -> LatentCodec:
    """The :class:`LatentCodec` of ``model.autoencoder``: an autoencoder run's EMA weights of its newest
    checkpoint (scale and shift from its autoencoder.json), or a local diffusers AutoencoderKL folder (its
    config's scaling_factor and shift_factor).  Loaded once per weights file and device."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    src = describe_autoencoder(path)
    if src.kind == "run":
        newest = list_checkpoints(src.path)[:1]
        key = _codec_key(src.path, newest[0] / "ema.safetensors", device) if newest else None
        if key in _CODECS:  # the sample grids of training build a Run each time: no reloading
            return _CODECS[key]
        ckpt, state = newest_weights(src.path, "ema", "model.autoencoder")
        weights_file = ckpt / "ema.safetensors"
    else:
        state = None
        weights_file = next(src.path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                            if (src.path / n).is_file())
    key = _codec_key(src.path, weights_file, device)
    if key in _CODECS:
        return _CODECS[key]
    if src.kind == "run":
        a = load_run_config(src.path).autoencoder
        autoencoder = build_autoencoder(src.in_channels, a.block_out_channels, a.latent_channels, a.layers_per_block,
                                        a.norm_groups)
        autoencoder.load_state_dict(state)
    else:
        autoencoder = load_diffusers_vae(src.path)
    identity = f"{src.kind}|{file_sha256(weights_file)}|scale={src.scale!r}|shift={src.shift!r}"
    codec = LatentCodec(autoencoder.to(device), src.scale, src.shift, identity, str(src.path))
    _CODECS.clear()  # one autoencoder at a time stays loaded
    _CODECS[key] = codec
    return codec


def check_latent_run(run: Run) -> None:
    """Warn when a latent run's autoencoder is no longer the one it was trained with (RUN/latents.json)."""
    stored = run.dir / LATENTS_FILE if run.dir is not None else None
    if run.codec is None or stored is None or not stored.is_file():
        return
    if json.loads(stored.read_text()).get("identity") != run.codec.identity:
        warnings.warn(f"run '{run.dir}' was trained on the latents of another version of the autoencoder "
                      f"{run.codec.source} (its weights or scale changed since); its samples may be poor")


def edit_inpaint(run: Run, model, image: torch.Tensor, mask: torch.Tensor, n: int, *,
                 labels: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
    """RePaint fillings of the white region of ``mask`` (1, H, W) in ``image`` (C, H, W, pixels) by ``run``'s
    denoiser ``model`` (guided as planned): (n, C, H, W) pixels on the CPU; ``options`` go to
    :func:`~ddpmlab.samplers.editing.inpaint`.  A latent run fills the image's latents where the mask,
    max-pooled to the latent resolution (a latent is redrawn where any of its pixels is), is set,
    decodes them, and keeps the image's own pixels outside the mask."""
    kw = dict(prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, labels=labels, device=run.device)
    if not run.is_latent:
        return inpaint(model, run.schedule, image, mask, n, **kw, **options)
    z = run.codec.encode(image[None].to(run.device))[0].cpu()
    z_mask = (F.adaptive_max_pool2d(mask[None].float(), z.shape[1:])[0] > 0.5).float()
    x = _decode(run, inpaint(model, run.schedule, z, z_mask, n, **kw, **options), options.get("batch_size", 64))
    return torch.where(mask[None] > 0.5, x, image[None])


def edit_conditioning(run: Run, n: int, label: Optional[int], guidance: Optional[float],
                      names: Dict[str, str]) -> tuple:
    """(model, labels, guidance) for editing ``n`` copies of a given picture: :func:`conditioning` with the
    run's train.sample_guidance only where a class is asked for (without one the fill keeps the
    picture's own class; :func:`plan_sampling` applies the same rule to img2img)."""
    if label is not None:
        guidance = run_guidance(run, guidance, option=names.get("guidance", "guidance"))
    model, labels = conditioning(run.model, n, label, guidance, run.cfg.train.label_dropout, names)
    return model, labels, guidance


def edit_img2img(run: Run, plan: "SamplingPlan", image: torch.Tensor, strength: float, n: int, *,
                 seed: int = 0, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """SDEdit variations of ``image`` (C, H, W, pixels) as planned: (n, C, H, W) pixels on the CPU; a latent
    run noises and denoises the image's latents and decodes them."""
    start = run.codec.encode(image[None].to(run.device))[0].cpu() if run.is_latent else image
    x = img2img(plan.model, run.schedule, start, strength, n, sampler=plan.sampler, steps=plan.steps,
                prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, labels=plan.labels, seed=seed,
                batch_size=batch_size, device=run.device, progress=progress, **plan.options)
    return _decode(run, x, batch_size) if run.is_latent else x


def _decode(run: Run, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A latent run's samples as pixels (decoded in batches on the run's device), on the CPU."""
    return torch.cat([run.codec.decode(b.to(run.device)).cpu() for b in z.split(batch_size)])


def load_diffusers_run(folder, device="auto") -> Run:
    """A local diffusers UNet2DModel + scheduler folder as a run (its outputs go to ./samples)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    cfg, model = load_diffusers_model(folder, device)
    return Run(cfg, model, NoiseSchedule.from_config(cfg.diffusion), device, None, str(folder), "model")


def condition_tag(label: Optional[int], guidance: Optional[float]) -> str:
    """'_class3_guidance2' for a class label and a guidance scale, '' for neither (file names)."""
    cls = "" if label is None else f"_class{label}"
    return cls + ("" if guidance is None else f"_guidance{guidance:g}")


@dataclass
class SamplingPlan:
    """Everything one sampler call needs: sampler, steps, its keyword options, the (guided) model, labels."""

    spec: SamplerSpec
    steps: int
    options: Dict[str, object]
    model: nn.Module
    labels: Optional[torch.Tensor] = None
    timesteps: Optional[str] = None
    label: Optional[int] = None
    guidance: Optional[float] = None
    cond: Optional[torch.Tensor] = None  # (n, C, H, W): an image-conditioned run's conditioning (super-resolution)

    @property
    def sampler(self) -> str:
        return self.spec.name

    def tag(self, seed: int) -> str:
        """A file-name stem, e.g. 'ddim_50steps_seed0', 'dpmpp_2m_karras_20steps_seed0_class3_guidance2'."""
        ts = f"_{self.timesteps}" if self.timesteps else ""
        return f"{self.sampler}{ts}_{self.steps}steps_seed{seed}{self.condition_tag()}"

    def condition_tag(self) -> str:
        return condition_tag(self.label, self.guidance)

    def describe(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.options.items() if k in ("variance", "eta", "spacing")
                        or (k == "timesteps" and isinstance(v, str)))
        return f"{self.sampler}, {self.steps} steps{extra}"


def default_sampler(cfg: Config) -> Tuple[str, Optional[int]]:
    """(sampler, steps or None) a run samples with when none is named and no recommendation exists:
    'student' for a distilled student, else the sampler and steps of the run's own samples
    (train.sample_sampler / train.sample_steps)."""
    if getattr(cfg, "distill", None) is not None and cfg.distill.teacher:
        return "student", None
    return cfg.train.sample_sampler, cfg.train.sample_steps


def _student_steps(run: Run, steps: Optional[int], timesteps: Optional[str], names: Dict[str, str]) -> tuple:
    """(steps, sampler options) of the student sampler on ``run``: its distilled steps unless ``steps``."""
    ds = run.cfg.distill
    if not ds.teacher:
        raise ConfigError(f"{names.get('sampler', 'sampler')} student samples a distilled student (ddpm distill); "
                          f"{run.dir or 'this run'} is a diffusion run: use ddim, dpmpp_2m, ...")
    if timesteps is not None:
        raise ConfigError(f"{names.get('timesteps', 'timesteps')}: the student sampler uses the grid it was "
                          "distilled on; drop it")
    steps = ds.steps if steps is None else steps
    check_student_steps(ds.method, steps, ds.steps, names.get("steps", "steps"))
    return steps, {"method": ds.method, "distilled_steps": ds.steps, "sigma_data": ds.sigma_data, "rho": ds.rho}


def read_recommendation(run_dir) -> Optional[dict]:
    """RUN/recommended_samplers.json as a dict ({"by_nfe": {10: {"sampler": ..., "timesteps": ...}}, ...}) or None."""
    path = Path(run_dir) / RECOMMENDATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        by_nfe = {int(k): v for k, v in data["by_nfe"].items()}
        for entry in by_nfe.values():
            get_spec(entry["sampler"]).check_step_schedule(entry.get("timesteps"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        warnings.warn(f"ignoring {path}: {type(e).__name__}: {e}; run ddpm bench samplers {run_dir} again")
        return None
    return {**data, "by_nfe": by_nfe}


def recommended_sampler(run: Run, steps: Optional[int] = None,
                        timesteps: Optional[str] = None) -> Optional[tuple]:
    """(sampler, timesteps, nfe) that ``ddpm bench samplers`` found best for this run, or None.

    With ``steps``: the recommendation for the largest benchmarked NFE <= steps (the smallest
    NFE if all are larger); without: the NFE whose best error was lowest (fewer NFE on a tie).
    A recommendation that cannot use the caller's ``timesteps`` is not taken.
    """
    rec = read_recommendation(run.dir) if run.dir is not None else None
    if not rec or not rec["by_nfe"]:
        return None
    by = rec["by_nfe"]
    if steps is None:
        nfe = min(by, key=lambda k: (by[k].get("error_ratio", float("inf")), k))
    else:
        nfe = max((k for k in by if k <= steps), default=min(by))
    entry = by[nfe]
    if timesteps is not None and timesteps not in get_spec(entry["sampler"]).step_schedules:
        return None
    return entry["sampler"], entry.get("timesteps"), nfe


def run_guidance(run: Run, guidance: Optional[float], log: Callable[[str], None] = print,
                 option: str = "guidance") -> Optional[float]:
    """``guidance``, or where it is None the conditional run's train.sample_guidance (said in one line).
    Edits of a given image (inpainting, img2img) take it only where a class is asked for: guided
    without one, the classes would be cycled over the images instead of kept."""
    if guidance is None and run.num_classes and run.cfg.train.sample_guidance is not None:
        guidance = float(run.cfg.train.sample_guidance)
        log(f"guidance {guidance:g}: the run's train.sample_guidance ({option} overrides; 0: the unconditional "
            "model)")
    return guidance


def plan_sampling(run: Run, sampler: Optional[str] = "ddim", steps: Optional[int] = None, n: int = 1, *,
                  timesteps: Optional[str] = None, options: Optional[dict] = None, label: Optional[int] = None,
                  guidance: Optional[float] = None, seed: int = 0, schedule_len: Optional[int] = None,
                  cycle_classes: bool = False, names: Optional[Dict[str, str]] = None,
                  log: Callable[[str], None] = print, cond: Optional[torch.Tensor] = None) -> SamplingPlan:
    """The sampler call for ``n`` samples of ``run``, every rule in one place.

    sampler: None means the run's recommendation (:func:`recommended_sampler`), else its default
    (:func:`default_sampler`: a student's own, or the run's train.sample_sampler and sample_steps).
    steps: default the sampler's own (ddpm: all ``schedule_len`` timesteps, default T; others 50),
    checked against the schedule.  options: the caller's explicit sampler options (None values
    are dropped); one that the sampler does not take is refused.  The ancestral sampler's
    variance defaults to the run's ``diffusion.variance``.  Class labels: ``label`` for all; with
    guidance and no label, or with ``cycle_classes`` on a conditional run, 0, 1, ..., K-1, 0, ...;
    otherwise none (a conditional run's "no label" row).  ``guidance`` None on a conditional run
    whose config sets train.sample_guidance: that scale (img2img only with a label).  ``names``
    maps option names to the caller's (e.g. {"steps": "--steps"}) for the messages.  ``cond``: what
    an image-conditioned run (model.condition) is conditioned on, (n or 1, C, H, W) at the image
    size (sample i gets row i).
    """
    names = names or {}
    rec = recommended_sampler(run, steps, timesteps) if sampler is None else None
    if rec is not None:  # no sampler named: what `ddpm bench samplers RUN` found best for this run
        sampler, timesteps, steps = rec[0], timesteps or rec[1], rec[2] if steps is None else steps
        log(f"sampler: {sampler}{' with ' + timesteps + ' timesteps' if timesteps else ''}, {steps} steps, as "
            f"recommended by ddpm bench samplers ({run.dir / RECOMMENDATION_FILE}; name --sampler to override)")
    if sampler is None:
        sampler, own_steps = default_sampler(run.cfg)
        if own_steps is not None:
            steps = own_steps if steps is None else steps
            log(f"sampler: {sampler}, {steps} steps: the run's train.sample_sampler (name "
                f"{names.get('sampler', 'sampler')} to override)")
    spec = get_spec(sampler, names.get("sampler", "sampler"))
    spec.check_step_schedule(timesteps, names.get("timesteps", "timesteps"))
    n_sched = run.T if schedule_len is None else schedule_len
    student_options = {}
    if spec.name == "student":  # a distilled student: its own grid, at most its distilled steps (progressive)
        steps, student_options = _student_steps(run, steps, timesteps, names)
    steps = spec.steps_for(n_sched, steps)
    if not 1 <= steps <= n_sched:
        span = "the model's num_timesteps" if schedule_len is None else "the timesteps from t0 down"
        raise ConfigError(f"{names.get('steps', 'steps')} must be between 1 and {n_sched} ({span}), got {steps}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    spec.check_options(given, names)
    given.update(student_options)
    if "variance" in spec.options:
        given["variance"] = variance_name(given.get("variance", run.cfg.diffusion.variance),
                                          names.get("variance", "variance"))
    cond = _check_condition(run, cond, n)
    net = run.model if cond is None else bind_condition(run.model, cond)
    if schedule_len is None or label is not None:  # img2img without a class keeps its input's class
        guidance = run_guidance(run, guidance, log, names.get("guidance", "guidance"))
    model, labels = conditioning(net, n, label, guidance, run.cfg.train.label_dropout, names)
    if labels is None and cycle_classes and run.num_classes:
        labels = torch.arange(n) % run.num_classes
    given.update(timesteps_options(spec.name, timesteps, model, run.schedule, run.shape, steps,
                                   prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, device=run.device,
                                   y=labels, seed=seed, log=log, where=names.get("timesteps", "timesteps")))
    return SamplingPlan(spec, steps, given, model, labels, timesteps, label, guidance, cond)


def _check_condition(run: Run, cond: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """``cond`` as (n, C, H, W) for an image-conditioned run (one row is repeated n times); refused otherwise."""
    kind = run.cfg.model.condition
    if cond is None:
        if kind != "none":
            raise ConfigError(f"{run.dir or 'this run'} is a super-resolution run (model.condition={kind}): it "
                              f"samples from a low-res picture; use `ddpm upscale {run.dir or 'RUN'} --image low.png`")
        return None
    if kind == "none":
        raise ConfigError(f"{run.dir or 'this run'} is not image-conditioned (model.condition=none): it takes no "
                          "conditioning image")
    if cond.ndim != 4 or cond.shape[0] not in (1, n) or tuple(cond.shape[1:]) != tuple(run.shape):
        raise ConfigError(f"the conditioning has shape {tuple(cond.shape)}; this run needs ({n} or 1, "
                          f"{', '.join(map(str, run.shape))}) for {n} samples")
    return cond.expand(n, *cond.shape[1:]).float().cpu()


def draw_samples(run: Run, plan: SamplingPlan, n: int, *, seed: int = 0, batch_size: int = 256,
                 progress: bool = True, callback=None) -> torch.Tensor:
    """``n`` samples of ``run`` as ``plan`` says: (n, *shape) float32 on the CPU, in the data's scale."""
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    if plan.cond is None:
        x = generate(plan.model, run.schedule, run.shape, n, sampler=plan.sampler, steps=plan.steps,
                     prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, batch_size=batch_size, seed=seed,
                     device=run.device, labels=plan.labels, progress=progress, callback=callback, **plan.options)
    else:
        x = _draw_conditioned(run, plan, n, seed, batch_size, progress, callback)
    if run.codec is not None:  # latent diffusion: x_0 is a latent; the decoder gives the pixels
        x = _decode(run, x, batch_size)
    return x


def _draw_conditioned(run: Run, plan: SamplingPlan, n: int, seed: int, batch_size: int, progress: bool,
                      callback) -> torch.Tensor:
    """draw_samples of an image-conditioned run: batch b (noise seed + b, as generate's batches) binds its
    own rows of plan.cond to the network, guided as planned (the rule of samplers.guidance.conditioning)."""
    if len(plan.cond) != n:
        raise ConfigError(f"the plan was made for {len(plan.cond)} samples (its conditioning), not {n}")
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        rows = slice(start, min(start + batch_size, n))
        net = bind_condition(run.model, plan.cond[rows].to(run.device))
        net = net if plan.guidance is None else guided(net, scale=plan.guidance)
        labels = None if plan.labels is None else plan.labels[rows]
        out.append(generate(net, run.schedule, run.shape, rows.stop - start, sampler=plan.sampler, steps=plan.steps,
                            prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, batch_size=batch_size,
                            seed=seed + b, device=run.device, labels=labels, progress=progress, callback=callback,
                            **plan.options))
    return torch.cat(out)


def grid_scale(shape: Sequence[int]) -> int:
    """Pixel repetition for a grid of (C, H, W) images: small images enlarged up to 4x, to ~128 px."""
    return max(1, min(4, 128 // max(shape[1:])))


@dataclass
class Output:
    """Where samples go: a picture file (``path``), or a folder of one PNG per sample plus ``grid.png``."""

    path: Path
    is_folder: bool

    @property
    def picture(self) -> Path:
        return self.path / "grid.png" if self.is_folder else self.path

    @property
    def raw(self) -> Path:
        return self.path / "samples.npz" if self.is_folder else self.path.with_suffix(".npz")


def resolve_output(out, default: Path, where: str = "out") -> Output:
    """The output for ``out`` (None: the file ``default``), checked before any sampling.

    A path that is an existing folder, ends with '/', or has no extension is a folder; a file
    needs an extension Pillow writes (.png, .jpg, ...).
    """
    if out is None:
        return Output(Path(default), False)
    text, path = str(out), Path(out)
    if path.is_dir() or text.endswith(("/", "\\")) or not path.suffix:
        return Output(path, True)
    if path.suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"{where} {text}: unknown picture extension '{path.suffix}'; use .png (or give a "
                          "folder for one PNG per sample)")
    return Output(path, False)


def write_raw(x: torch.Tensor, output: Output) -> Path:
    """The samples as .npz (key 'samples', the data's scale), written before any picture."""
    output.raw.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output.raw, samples=x.numpy())
    return output.raw
