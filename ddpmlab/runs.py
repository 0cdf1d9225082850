"""The run layer: a trained run loaded once, and the one set of rules for sampling from it.

Every front end (the ``ddpm`` command, evaluation, pictures, benchmarks, training's own
sample grids) goes through here, so that they agree on:

* the device (:func:`resolve_device`: ``auto`` picks CUDA, then MPS, then the CPU; a device
  that is not there is refused in one line);
* loading a run (:func:`load_run`: config, weights of the newest loadable checkpoint,
  schedule, sample shape) or a local diffusers folder (:func:`load_diffusers_run`);
* a sampler call (:func:`plan_sampling`: default steps, the run's own reverse variance,
  the step schedule, which options apply to which sampler, class labels and guidance);
* where the results go (:func:`resolve_output`, :func:`write_raw`): the raw samples are
  written before any picture, and ``out`` may be a file or a folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ddpmlab.config import Config
from ddpmlab.data import data_shape
from ddpmlab.diffusion.reverse import variance_name
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.checkpoint import load_run_config, newest_weights, require_run_dir
from ddpmlab.io.diffusers_bridge import load_diffusers_model
from ddpmlab.io.weights import load_state_dict_file
from ddpmlab.models import build_model
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import conditioning
from ddpmlab.samplers.registry import SamplerSpec, get_spec, timesteps_options

DEVICE_KINDS = ("cpu", "cuda", "mps")
WEIGHTS = ("ema", "model")


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

    @property
    def shape(self) -> tuple:
        """The shape of one sample: (C, H, W) for images, (2,) for 2-D points."""
        return data_shape(self.cfg)

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
        return 1.0 if self.is_image else None

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
    return Run(cfg, model.to(device).eval(), NoiseSchedule.from_config(cfg.diffusion), device, run_dir, source,
               weights)


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


def plan_sampling(run: Run, sampler: str = "ddim", steps: Optional[int] = None, n: int = 1, *,
                  timesteps: Optional[str] = None, options: Optional[dict] = None, label: Optional[int] = None,
                  guidance: Optional[float] = None, seed: int = 0, schedule_len: Optional[int] = None,
                  cycle_classes: bool = False, names: Optional[Dict[str, str]] = None,
                  log: Callable[[str], None] = print) -> SamplingPlan:
    """The sampler call for ``n`` samples of ``run``, every rule in one place.

    steps: default the sampler's own (ddpm: all ``schedule_len`` timesteps, default T; others 50),
    checked against the schedule.  options: the caller's explicit sampler options (None values
    are dropped); one that the sampler does not take is refused.  The ancestral sampler's
    variance defaults to the run's ``diffusion.variance``.  Class labels: ``label`` for all; with
    guidance and no label, or with ``cycle_classes`` on a conditional run, 0, 1, ..., K-1, 0, ...;
    otherwise none (a conditional run's "no label" row).  ``names`` maps option names to the
    caller's (e.g. {"steps": "--steps"}) for the messages.
    """
    names = names or {}
    spec = get_spec(sampler, names.get("sampler", "sampler"))
    spec.check_step_schedule(timesteps, names.get("timesteps", "timesteps"))
    n_sched = run.T if schedule_len is None else schedule_len
    steps = spec.steps_for(n_sched, steps)
    if not 1 <= steps <= n_sched:
        span = "the model's num_timesteps" if schedule_len is None else "the timesteps from t0 down"
        raise ConfigError(f"{names.get('steps', 'steps')} must be between 1 and {n_sched} ({span}), got {steps}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    spec.check_options(given, names)
    if "variance" in spec.options:
        given["variance"] = variance_name(given.get("variance", run.cfg.diffusion.variance),
                                          names.get("variance", "variance"))
    model, labels = conditioning(run.model, n, label, guidance, run.cfg.train.label_dropout, names)
    if labels is None and cycle_classes and run.num_classes:
        labels = torch.arange(n) % run.num_classes
    given.update(timesteps_options(spec.name, timesteps, model, run.schedule, run.shape, steps,
                                   prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, device=run.device,
                                   y=labels, seed=seed, log=log, where=names.get("timesteps", "timesteps")))
    return SamplingPlan(spec, steps, given, model, labels, timesteps, label, guidance)


def draw_samples(run: Run, plan: SamplingPlan, n: int, *, seed: int = 0, batch_size: int = 256,
                 progress: bool = True, callback=None) -> torch.Tensor:
    """``n`` samples of ``run`` as ``plan`` says: (n, *shape) float32 on the CPU, in the data's scale."""
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    return generate(plan.model, run.schedule, run.shape, n, sampler=plan.sampler, steps=plan.steps,
                    prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, batch_size=batch_size, seed=seed,
                    device=run.device, labels=plan.labels, progress=progress, callback=callback, **plan.options)


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
