"""Fine-tuning: ``ddpm finetune SRC [--method full|lora] [key=value ...]``.

A new run whose network starts from the EMA weights of SRC (a ddpmlab run, or a local diffusers
``UNet2DModel`` folder through :mod:`ddpmlab.io.diffusers_bridge`) and trains on the data that data.*
names, with its own config (SRC's, its model and diffusion sections fixed; train.*, data.* and lora.*
overridable), checkpoints, resume and EMA: :class:`FinetuneTask` is ``ddpm train``'s task with those
weights.

* ``--method full``: every weight trains.
* ``--method lora`` (Hu et al. 2022): the layers lora.target_modules names get low-rank adapters
  W_0 + (alpha / r) B A through peft (:mod:`ddpmlab.models.lora`); only A and B train (and only they are
  averaged by the EMA), W_0 stays SRC's bit for bit.  At the end RUN/adapter.safetensors holds the EMA's
  adapters alone, which ``ddpm sample BASE --lora RUN/adapter.safetensors[:SCALE]`` applies to the base;
  the run's checkpoints keep the whole network, so the run samples and resumes without SRC.
"""

from __future__ import annotations

import copy
import shlex
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ddpmlab.config import Config, config_from_dict
from ddpmlab.config.load import apply_overrides
from ddpmlab.data import data_shape
from ddpmlab.errors import ConfigError, DDPMError, about
from ddpmlab.io.adapters import ADAPTER_FILE, save_adapter
from ddpmlab.io.checkpoint import CONFIG_FILE, is_run_dir, require_run_dir
from ddpmlab.io.diffusers_bridge import find_diffusers_folders
from ddpmlab.models import build_model, count_parameters
from ddpmlab.models.lora import adapter_state, add_lora, is_adapter_key, lora_targets
from ddpmlab.runs import Run, load_diffusers_run, load_run, own_sampler
from ddpmlab.samplers.registry import get_spec
from ddpmlab.training.loop import run
from ddpmlab.training.run_folder import resume_config_from
from ddpmlab.training.task import Trainee, adamw
from ddpmlab.training.tasks.diffusion import DiffusionTask, train_names

FIXED = "its model and diffusion sections are SRC's"


class FinetuneTask(DiffusionTask):
    """``ddpm train``'s task (data, objective, steps, drawings, evaluation) on a network that starts from
    ``init`` (SRC's EMA weights; None on resume, where the checkpoint holds the weights), whole or through
    LoRA adapters (finetune.method)."""

    resume_command = "ddpm finetune --resume"
    bar_label = "fine-tuning"

    def __init__(self, cfg: Config, init: Optional[dict] = None):
        super().__init__(cfg)
        self.init = init

    @property
    def lora(self) -> bool:
        return self.cfg.finetune.method == "lora"

    def load_data(self) -> None:
        super().load_data()
        k, names = self.cfg.model.num_classes, list(getattr(self.pixels, "class_names", None) or [])
        if k and len(names) > k:
            raise ConfigError(f"data.*: the data has {len(names)} classes ({', '.join(names[:4])}, ...) but the model "
                              f"of {self.cfg.finetune.source} knows {k} (model.num_classes), which fine-tuning keeps; "
                              f"give data with at most {k} class folders")

    def build(self) -> Trainee:
        """SRC's weights in ``ddpm train``'s network (its class names and objective come with it), adapters for
        finetune.method lora (everything else frozen), the EMA and AdamW over what trains."""
        model = super().build().model
        if self.init is not None:
            model.load_state_dict(self.init)
        if self.lora:
            add_lora(model, self.cfg)  # A from (train.seed), B = 0: the outputs are SRC's exactly
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = adamw(self.cfg, [p for p in model.parameters() if p.requires_grad], self.ctx.device)
        return Trainee(model, model, ema, opt)

    def describe(self) -> str:
        net, ctx = self.trainee.raw, self.ctx
        total = count_parameters(net)
        what = f"{total / 1e6:.2f}M parameters"
        if self.lora:
            trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
            layers = len({k.split(".lora_A.")[0] for k in net.state_dict() if ".lora_A." in k})
            what = (f"LoRA rank {self.cfg.lora.rank} on {layers} layers: {trained / 1e3:.1f}k of {total / 1e6:.2f}M "
                    "parameters train")
        return (f"fine-tuning {ctx.run_dir} from the weights of {self.cfg.finetune.source} ({what}), "
                f"{len(self.dataset)} examples, {self.cfg.train.steps} steps on {ctx.device} "
                f"x{ctx.accelerator.num_processes}, {ctx.precision}")

    def finish(self, seconds: float, skipped: int) -> None:
        """The final samples and next commands; a LoRA run then writes RUN/adapter.safetensors (the EMA's adapters)
        and closes with its size against the full model's."""
        super().finish(seconds, skipped)
        if not self.lora:
            return
        cfg, ema = self.cfg, self.trainee.ema
        state = adapter_state(ema)
        targets = sorted({k.split(".lora_")[0].rpartition(".")[2] for k in state})
        path = save_adapter(self.ctx.run_dir / ADAPTER_FILE, state, cfg.lora.rank, cfg.lora.alpha, targets,
                            cfg.finetune.source)
        full = sum(v.numel() * v.element_size() for k, v in ema.state_dict().items() if not is_adapter_key(k))
        size = path.stat().st_size
        print(f"adapter (EMA): {path}, {len(state)} tensors, {size / 1e3:.1f} kB = {100 * size / full:.2f}% of the "
              f"full model's {full / 1e6:.2f} MB; on its base: ddpm sample {shlex.quote(cfg.finetune.source)} "
              f"--lora {shlex.quote(str(path))}")


# ----------------------------------------------------------------------------- from a source

def load_source(source, device="cpu") -> Run:
    """SRC with its EMA weights: a ddpmlab run folder (a LoRA run's adapters baked in), or a local diffusers
    UNet2DModel folder; anything else is one line saying what SRC must be."""
    path = Path(source)
    if is_run_dir(path):
        return load_run(path, "ema", device)
    if path.is_dir() and ((path / "unet" / "config.json").is_file() or (path / "config.json").is_file()):
        find_diffusers_folders(path)  # its scheduler must be there too
        return load_diffusers_run(path, device)
    why = "does not exist" if not path.exists() else f"has no {CONFIG_FILE} (a run) nor a diffusers config.json"
    raise DDPMError(f"fine-tuning source '{source}' {why}: give a run folder of ddpm train or a local diffusers "
                    "UNet2DModel folder (unet/ and scheduler/, as save_pretrained writes it)")


def check_source(scfg: Config, source) -> None:
    """Refuse, in one line, what ``ddpm finetune`` cannot start from: a distilled student or a text run."""
    if scfg.distill.teacher is not None:
        raise DDPMError(f"'{source}' is a distilled student (of {scfg.distill.teacher}), which samples by its own "
                        "rules; fine-tune its teacher and distil the result")
    if scfg.text.encoder:
        raise DDPMError(f"'{source}' is a text run (text.encoder {scfg.text.encoder}); ddpm finetune takes "
                        "unconditional and class-conditional runs")


@torch.no_grad()
def check_same_network(src: Run, cfg: Config) -> None:
    """Refuse a diffusers source whose UNet2DModel options a config cannot hold (its time embedding's shift or
    flip, its downsampling padding, norm eps or head width): the network ``cfg`` builds, with SRC's weights, must
    compute what SRC does on a probe."""
    net = build_model(cfg).eval()
    net.load_state_dict(src.model.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *data_shape(cfg), generator=g)
    t = torch.tensor([10.0, cfg.diffusion.num_timesteps - 1.0])
    y = torch.tensor([0, cfg.model.num_classes]) if cfg.model.num_classes else None
    ours, theirs = net(x, t, y), src.model.to("cpu")(x, t, y)
    if not torch.allclose(ours, theirs, atol=1e-5 * max(1.0, theirs.abs().max().item())):
        raise DDPMError(f"diffusers model '{cfg.finetune.source}' uses UNet2DModel options a ddpmlab config cannot "
                        "hold (freq_shift, flip_sin_to_cos, downsample_padding, norm_eps or attention_head_dim other "
                        "than ddpm export writes them); ddpm sample --from-diffusers samples it, but it cannot be "
                        "fine-tuned")


def _finetune_key(method: str):
    def allowed(key: str) -> bool:
        section = key.partition(".")[0]
        return section in ("train", "data") or (section == "lora" and method == "lora")
    return allowed


def finetune_config(scfg: Config, source, method: str = "full", overrides: Sequence[str] = ()) -> Config:
    """The config of a fine-tuning of SRC (its config ``scfg``): SRC's, with the finetune section (source, method)
    and the key=value ``overrides`` of train.*, data.* and (``method`` lora) lora.*; the data must have the shape
    SRC's model takes."""
    check_source(scfg, source)
    d = scfg.to_dict()
    d.pop("reflow", None)  # a reflowed SRC's pairs are not this run's data
    d["finetune"] = {"source": str(source), "method": method}
    d["train"]["name"] = None  # the new run's folder is its own
    only = "train.*, data.*" + (" and lora.*" if method == "lora" else " (lora.* with --method lora)")
    apply_overrides(d, overrides, _finetune_key(method), lambda key: (
        f"command line: {key} cannot change in a fine-tuning ({FIXED}); it takes {only}"), "train.steps=500")
    cfg = config_from_dict(d, source=f"{source} + command line")
    if cfg.data.dataset == "folder" and cfg.data.path == scfg.data.path and not is_run_dir(Path(source)):
        raise ConfigError(f"command line: a diffusers folder holds no training data: name it with data.*, e.g. "
                          f"data.path=IMAGES (a folder of {'x'.join(map(str, data_shape(scfg)[1:]))} images, "
                          f"data.channels={scfg.data.channels})")
    if data_shape(cfg) != data_shape(scfg):
        raise ConfigError(f"command line: data.* gives examples of shape {data_shape(cfg)}, but the model of "
                          f"'{source}' takes {data_shape(scfg)} ({FIXED}); set data.image_size and data.channels to "
                          "match")
    return cfg


def finetune_run(source=None, method: str = "full", overrides: Optional[List[str]] = None, resume_dir=None,
                 progress: bool = True, stop_after: Optional[int] = None) -> Path:
    """``ddpm finetune``: a new fine-tuning of SRC beside it (or in train.out_dir/train.name), or ``resume_dir``
    continued (with the key=value changes a resumed ``ddpm train`` takes); its folder.  ``stop_after``: save and
    stop after this many training steps in all."""
    overrides = list(overrides or [])
    init = None
    if resume_dir is not None:
        run_dir = require_run_dir(resume_dir)
        cfg = resume_config_from(run_dir, overrides)
        if not cfg.finetune.source:
            raise DDPMError(f"'{run_dir}' is not a fine-tuning run (no finetune.source in its {CONFIG_FILE}); "
                            f"continue a training run with `ddpm train --resume {run_dir}`")
    else:
        src = load_source(source)
        cfg = finetune_config(src.cfg, source, method, overrides)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = (Path(cfg.train.out_dir) / cfg.train.name if cfg.train.name
                   else Path(source).parent / f"{Path(source).name}-{method}-{stamp}")
        if cfg.finetune.method == "lora":
            lora_targets(src.model, cfg.lora.target_modules)  # names no layer: refused before any run folder
        if src.dir is None:  # a diffusers folder
            check_same_network(src, cfg)
        init = src.model.state_dict()
        print(f"fine-tuning {source} ({src.checkpoint}{', EMA' if src.dir is not None else ''}; {method}): {run_dir}")
    with train_names():  # an unknown train.sample_sampler fails now, not after the last step
        with about("sampler"):
            get_spec(own_sampler(cfg))
    return run(FinetuneTask(cfg, init), run_dir, resume_dir is not None, progress, stop_after=stop_after)
