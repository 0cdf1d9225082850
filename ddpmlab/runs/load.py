"""Loading a run: the device, a run folder or a local diffusers folder as a :class:`Run`, latent runs' autoencoder.

* :func:`resolve_device`: ``auto`` picks CUDA, then MPS, then the CPU; a device that is not
  there is refused in one line;
* :func:`load_run`: config, weights of the newest loadable checkpoint, schedule, sample shape,
  class names; :func:`load_diffusers_run` a local diffusers folder;
* latent runs (``model.autoencoder``, Rombach et al. 2022) carry the autoencoder's decoder
  (:func:`load_autoencoder`), so every front end's samples come back as pixels.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ddpmlab.config import Config
from ddpmlab.data import data_shape, image_shape
from ddpmlab.data.latents import LATENTS_FILE, describe_autoencoder, file_sha256
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import OPTION, DDPMError, OptionError
from ddpmlab.io.checkpoint import list_checkpoints, load_run_config, newest_weights, require_run_dir
from ddpmlab.io.diffusers_bridge import load_diffusers_model
from ddpmlab.io.weights import load_state_dict_file
from ddpmlab.models import build_model
from ddpmlab.models.autoencoder import LatentCodec, build_autoencoder, load_diffusers_vae
from ddpmlab.models.text import build_text_encoder
from ddpmlab.models.text_to_image import build_text_to_image
from ddpmlab.runs.classes import class_index, describe_classes, load_class_names
from ddpmlab.runs.prompts import load_run_prompts

DEVICE_KINDS = ("cpu", "cuda", "mps")
WEIGHTS = ("ema", "model")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, mps or cpu (what is there); else the named device, refused when absent
    (an OptionError about 'device')."""
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise OptionError("device", f"{OPTION}: unknown device '{name}'; choose auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise OptionError("device", f"{OPTION}: '{name}' but no CUDA GPU is visible (this torch "
                                     f"{torch.__version__} is {build}); use auto or cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise OptionError("device", f"{OPTION}: '{name}' but only {torch.cuda.device_count()} CUDA GPU(s) are "
                                     "visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device", f"{OPTION}: 'mps' but this machine has no Apple GPU available to torch; use auto "
                                 "or cpu")
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
    class_names: Optional[List[str]] = None  # label i's name (RUN/classes.json when None; [] without names)
    prompts: Optional[List[str]] = None  # a text run's own prompts (RUN/samples/prompts.txt when None)

    def __post_init__(self):
        if self.codec is None and self.cfg.model.autoencoder:
            self.codec = load_autoencoder(self.cfg.model.autoencoder, self.device)
        if self.class_names is None:
            self.class_names = load_class_names(self.dir) if self.num_classes else []
        if self.prompts is None:
            self.prompts = load_run_prompts(self.dir) if self.is_text else []

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
    def is_audio(self) -> bool:
        """Sound (data.dataset=audio): samples (C, L) in [-1, 1] at data.sample_rate."""
        return self.cfg.data.dataset == "audio"

    @property
    def is_text(self) -> bool:
        """Text-conditioned (text.encoder set): its model is a TextToImage that takes prompts."""
        return bool(getattr(self.cfg, "text", None) is not None and self.cfg.text.encoder)

    @property
    def num_classes(self) -> int:
        return int(self.cfg.model.num_classes or 0)

    @property
    def T(self) -> int:
        return self.schedule.num_timesteps

    @property
    def clip_x0(self) -> Optional[float]:
        """Predicted x0 is clamped to the data range [-1, 1] for images (Ho et al.'s sampler) and sound, not for
        points."""
        return 1.0 if (self.is_image or self.is_audio) and not self.is_latent else None  # latents: no fixed range

    def class_index(self, label: Union[int, str, None]) -> Optional[int]:
        """The label of class ``label`` (a name or an index; None stays None), checked against this run."""
        return class_index(label, self.class_names, self.num_classes)

    def describe_classes(self) -> str:
        """'0 cat, 1 dog' (named classes), '0..9' (indices only), '' (an unconditional run)."""
        return describe_classes(self.class_names, self.num_classes)

    def folder(self, kind: str) -> Path:
        """RUN/<kind> (samples, viz, eval, bench); ./<kind> without a run folder."""
        return (self.dir if self.dir is not None else Path(".")) / kind



def load_run(run_dir, weights: str = "ema", device="auto", weights_file=None) -> Run:
    """The run in ``run_dir`` with its ``weights`` ('ema' or 'model') of the newest loadable checkpoint.

    ``weights_file`` replaces them by a file's (safetensors, or a PyTorch state dict read with
    ``weights_only=True``).  ``device``: a name for :func:`resolve_device` or a torch.device.
    A bad choice of weights is an OptionError about 'weights'.
    """
    if weights not in WEIGHTS:
        raise OptionError("weights", f"{OPTION}: unknown weights '{weights}'; choose ema or model")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.stage == "autoencoder":
        raise DDPMError(f"'{run_dir}' is an autoencoder run (ddpm train-autoencoder), not a diffusion model; train "
                        f"latent diffusion on it with `ddpm train --config mnist_latent model.autoencoder={run_dir}`")
    if cfg.controlnet.base:
        raise DDPMError(f"'{run_dir}' is a ControlNet (of {cfg.controlnet.base}), not a denoiser; sample its base with "
                        f"it: ddpm sample {cfg.controlnet.base} --controlnet {run_dir} --control picture.png")
    _locate_autoencoder(cfg, run_dir)
    model = build_run_model(cfg, run_dir, device)
    if weights_file is None:
        path, state = newest_weights(run_dir, weights)
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


def build_run_model(cfg: Config, run_dir, device) -> nn.Module:
    """The untrained network of a run's config: its denoiser, with its text encoder for a text run (the own
    encoder's tokenizer read from ``run_dir``, a frozen encoder from its folder)."""
    if not cfg.text.encoder:
        return build_model(cfg)
    return build_text_to_image(cfg, build_text_encoder(cfg.text, run_dir, device=device))


def read_latents_record(run_dir: Path) -> dict:
    """RUN/latents.json (what a latent run was trained on); a damaged file is one line saying what to do."""
    path = Path(run_dir) / LATENTS_FILE
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as e:
        raise DDPMError(f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); delete it and "
                        f"give the autoencoder in {run_dir / 'config.yaml'} (model.autoencoder) as a path that "
                        "exists from here") from None


def _locate_autoencoder(cfg: Config, run_dir: Path) -> None:
    """A latent run's model.autoencoder, relative to where it was trained: if it is not found from here,
    the absolute path stored in RUN/latents.json at training time."""
    ae = cfg.model.autoencoder
    stored = Path(run_dir) / LATENTS_FILE
    if not ae or Path(ae).expanduser().exists() or not stored.is_file():
        return
    cfg.model.autoencoder = read_latents_record(run_dir).get("autoencoder", ae)


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
        try:
            ckpt, state = newest_weights(src.path, "ema")
        except OptionError:  # no option picks an autoencoder's weights: its EMA or nothing
            raise DDPMError(f"model.autoencoder '{src.path}': its newest checkpoint has no EMA weights "
                            "(ema.safetensors); give an autoencoder run that has them") from None
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
    if read_latents_record(run.dir).get("identity") != run.codec.identity:
        warnings.warn(f"run '{run.dir}' was trained on the latents of another version of the autoencoder "
                      f"{run.codec.source} (its weights or scale changed since); its samples may be poor")


def load_diffusers_run(folder, device="auto") -> Run:
    """A local diffusers UNet2DModel + scheduler folder as a run (its outputs go to ./samples)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    cfg, model = load_diffusers_model(folder, device)
    return Run(cfg, model, NoiseSchedule.from_config(cfg.diffusion), device, None, str(folder), "model")

