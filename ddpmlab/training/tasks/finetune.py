"""Fine-tuning: ``ddpm finetune SRC [--method full|lora|textual-inversion|dreambooth] [key=value ...]``.

A new run whose network starts from the EMA weights of SRC (a ddpmlab run, or a local diffusers
``UNet2DModel`` folder through :mod:`ddpmlab.io.diffusers_bridge`) and trains on the data that data.*
names, with its own config (SRC's, its model and diffusion sections fixed; train.*, data.*, lora.* and the
methods' finetune.* keys overridable), checkpoints, resume and EMA.  Each method is a task on the one loop:

* ``full`` and ``lora``: :class:`~ddpmlab.training.tasks.finetune_base.FinetuneTask`, ``ddpm train``'s task on
  SRC's weights, all of them or LoRA adapters (Hu et al. 2022);
* ``textual-inversion`` (a text run): :class:`~ddpmlab.training.tasks.textual_inversion.TextualInversionTask`,
  only a new token's embedding (Gal et al. 2022);
* ``dreambooth`` (a text run): :class:`~ddpmlab.training.tasks.dreambooth.DreamBoothTask`, a subject's few
  images under a rare identifier with prior preservation (Ruiz et al. 2023), all weights or LoRA adapters.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ddpmlab.config import Config, config_from_dict
from ddpmlab.config.finetune import CONCEPT_METHODS
from ddpmlab.config.load import apply_overrides
from ddpmlab.data import data_shape
from ddpmlab.errors import ConfigError, DDPMError, about
from ddpmlab.io.checkpoint import is_run_dir
from ddpmlab.models import build_model
from ddpmlab.models.concepts import CONCEPTS_FILE, check_new_token, word_id
from ddpmlab.models.lora import lora_targets
from ddpmlab.runs import Run, own_sampler
from ddpmlab.samplers.registry import get_spec
from ddpmlab.training.loop import run
from ddpmlab.training.run_folder import resume_derived
from ddpmlab.training.tasks.diffusion import train_names
from ddpmlab.training.tasks.dreambooth import DreamBoothTask
from ddpmlab.training.tasks.finetune_base import FinetuneTask, load_source
from ddpmlab.training.tasks.textual_inversion import TextualInversionTask

FIXED = "its model and diffusion sections are SRC's"


def check_source(scfg: Config, source, method: str = "full") -> None:
    """Refuse, in one line, what ``ddpm finetune`` cannot start from: a distilled student, a run without text for
    textual inversion or DreamBooth, a frozen encoder's textual inversion."""
    if scfg.distill.teacher is not None:
        raise DDPMError(f"'{source}' is a distilled student (of {scfg.distill.teacher}), which samples by its own "
                        "rules; fine-tune its teacher and distil the result")
    if method in CONCEPT_METHODS and not scfg.text.encoder:
        raise DDPMError(f"--method {method} learns a concept named in prompts, but '{source}' is no text run "
                        "(text.encoder null); train a text run first (ddpm train --config shapes_text), or use "
                        "--method full or lora")
    if scfg.text.encoder and scfg.text.encoder != "own" and (Path(source) / CONCEPTS_FILE).is_file():
        raise DDPMError(f"'{source}' holds tokens learned by textual inversion for its frozen text encoder "
                        f"({CONCEPTS_FILE}); fine-tune its source {scfg.finetune.source} instead")


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


def _finetune_key(method: str, lora: bool, text: bool):
    def allowed(key: str) -> bool:
        section = key.partition(".")[0]
        return (section in ("train", "data") or (section == "lora" and lora)
                or (section == "finetune" and method in CONCEPT_METHODS and key not in ("finetune.source",
                                                                                      "finetune.method"))
                or (key == "text.caption_dropout" and text))
    return allowed


def finetune_config(scfg: Config, source, method: str = "full", overrides: Sequence[str] = ()) -> Config:
    """The config of a fine-tuning of SRC (its config ``scfg``): SRC's, with the finetune section (source, method)
    and the key=value ``overrides`` of train.*, data.*, lora.* (LoRA), finetune.* (textual inversion, DreamBooth)
    and text.caption_dropout (a text run); the data must have the shape SRC's model takes.  Textual inversion
    encodes its captions in every step (text.cache off)."""
    check_source(scfg, source, method)
    d = scfg.to_dict()
    d.pop("reflow", None)  # a reflowed SRC's pairs are not this run's data
    d["finetune"] = {"source": str(source), "method": method}
    d["train"]["name"] = None  # the new run's folder is its own
    if method == "textual-inversion":
        d["text"]["cache"] = False
    lora = method in ("lora", "dreambooth")  # dreambooth: with finetune.lora=true
    only = ("train.*, data.*" + (", lora.*" if lora else "") + (", finetune.*" if method in CONCEPT_METHODS else "")
            + (", text.caption_dropout" if scfg.text.encoder else ""))
    apply_overrides(d, overrides, _finetune_key(method, lora, bool(scfg.text.encoder)), lambda key: (
        f"command line: {key} cannot change in a fine-tuning --method {method} ({FIXED}); it takes {only}"),
        "train.steps=500")
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


def make_task(cfg: Config, init: Optional[dict] = None, src: Optional[Run] = None) -> FinetuneTask:
    """The task of finetune.method, starting from ``init`` (None: resumed)."""
    method = cfg.finetune.method
    if method == "textual-inversion":
        return TextualInversionTask(cfg, init)
    if method == "dreambooth":
        return DreamBoothTask(cfg, init, src)
    return FinetuneTask(cfg, init)


def finetune_run(source=None, method: str = "full", overrides: Optional[List[str]] = None, resume_dir=None,
                 progress: bool = True, stop_after: Optional[int] = None) -> Path:
    """``ddpm finetune``: a new fine-tuning of SRC beside it (or in train.out_dir/train.name), or ``resume_dir``
    continued (with the key=value changes a resumed ``ddpm train`` takes); its folder.  ``stop_after``: save and
    stop after this many training steps in all."""
    overrides = list(overrides or [])
    init, src = None, None
    if resume_dir is not None:
        run_dir, cfg = resume_derived(resume_dir, overrides, "finetune.source", "fine-tuning")
    else:
        src = load_source(source)
        cfg = finetune_config(src.cfg, source, method, overrides)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = (Path(cfg.train.out_dir) / cfg.train.name if cfg.train.name
                   else Path(source).parent / f"{Path(source).name}-{method}-{stamp}")
        if cfg.finetune.method == "lora" or (cfg.finetune.method == "dreambooth" and cfg.finetune.lora):
            lora_targets(src.model, cfg.lora.target_modules)  # names no layer: refused before any run folder
        if src.dir is None:  # a diffusers folder
            check_same_network(src, cfg)
        if cfg.finetune.method == "textual-inversion":  # refused before any run folder
            check_new_token(src.model.encoder, cfg.finetune.token)
            word_id(src.model.encoder, cfg.finetune.init_token)
        init = src.model.state_dict()
        print(f"fine-tuning {source} ({src.checkpoint}{', EMA' if src.dir is not None else ''}; {method}): {run_dir}")
    with train_names():  # an unknown train.sample_sampler fails now, not after the last step
        with about("sampler"):
            get_spec(own_sampler(cfg))
    task = make_task(cfg, init, src)
    return run(task, run_dir, resume_dir is not None, progress, stop_after=stop_after)
