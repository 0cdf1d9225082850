"""The task every fine-tuning method builds on: :class:`FinetuneTask`, ``ddpm train``'s task on a network that
starts from SRC's EMA weights (a ddpmlab run, or a local diffusers folder), whole or through LoRA adapters.

* ``--method full``: every weight trains.
* ``--method lora`` (Hu et al. 2022), and DreamBooth with finetune.lora: the layers lora.target_modules names get
  low-rank adapters W_0 + (alpha / r) B A through peft (:mod:`ddpmlab.models.lora`; a text run's in its denoiser);
  only A and B train (and only they are averaged by the EMA), W_0 stays SRC's bit for bit.  At the end
  RUN/adapter.safetensors holds the EMA's adapters alone, which ``ddpm sample BASE --lora
  RUN/adapter.safetensors[:SCALE]`` applies to the base, and where the UNet maps to diffusers'
  ``UNet2DConditionModel`` RUN/pytorch_lora_weights.safetensors holds them as ``load_lora_weights`` reads them
  (:mod:`ddpmlab.io.diffusers_lora`); the run's checkpoints keep the whole network, so the run samples and
  resumes without SRC.

A text run with its own encoder starts from SRC's tokenizer (RUN/tokenizer.json), to which a method may add
words (:meth:`FinetuneTask.new_tokens`: textual inversion's token, DreamBooth's identifier), each a new row of
the token embedding that starts as another word's row.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from ddpmlab.config import Config
from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.adapters import ADAPTER_FILE, save_adapter
from ddpmlab.io.checkpoint import CONFIG_FILE, is_run_dir
from ddpmlab.io.diffusers_bridge import find_diffusers_folders
from ddpmlab.io.diffusers_lora import save_diffusers_lora
from ddpmlab.models import count_parameters
from ddpmlab.models.lora import adapter_state, add_lora, is_adapter_key
from ddpmlab.models.text import OWN
from ddpmlab.runs import Run, load_diffusers_run, load_run
from ddpmlab.training.task import Trainee, adamw
from ddpmlab.training.tasks.diffusion import DiffusionTask

TOKEN_TABLE = "text_encoder.token_embedding.weight"  # the own text encoder's token embedding in a text run's weights


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
        f = self.cfg.finetune
        return f.method == "lora" or (f.method == "dreambooth" and f.lora)

    @property
    def own_text(self) -> bool:
        return self.cfg.text.encoder == OWN

    def load_data(self) -> None:
        super().load_data()
        k, names = self.cfg.model.num_classes, list(getattr(self.pixels, "class_names", None) or [])
        if k and len(names) > k:
            raise ConfigError(f"data.*: the data has {len(names)} classes ({', '.join(names[:4])}, ...) but the model "
                              f"of {self.cfg.finetune.source} knows {k} (model.num_classes), which fine-tuning keeps; "
                              f"give data with at most {k} class folders")

    # -- words of an own text encoder
    def new_tokens(self, tokenizer: CaptionTokenizer) -> List[Tuple[str, int]]:
        """(token, id of the word whose row it starts from) of each word this run adds to SRC's vocabulary."""
        return []

    def start_vocabulary(self, init: dict) -> dict:
        """A new run of an own-encoder text run: SRC's tokenizer with :meth:`new_tokens` added, written to
        RUN/tokenizer.json (where the text encoder is built from), and ``init`` with a row per new token."""
        cfg, ctx = self.cfg, self.ctx
        tokenizer = CaptionTokenizer.load(Path(cfg.finetune.source), cfg.text.max_length)
        starts = [row for _, row in self.new_tokens(tokenizer)]  # each adds its token to the tokenizer
        if ctx.main:
            tokenizer.save(ctx.run_dir)
        ctx.accelerator.wait_for_everyone()
        if not starts:
            return init
        table = init[TOKEN_TABLE]
        return {**init, TOKEN_TABLE: torch.cat([table, table[starts]])}

    # -- networks
    def network(self) -> nn.Module:
        """SRC's weights in ``ddpm train``'s network (its class names, objective and tokenizer come with it),
        with LoRA adapters (everything else then frozen)."""
        if self.init is not None and self.text is not None and self.own_text:
            self.init = self.start_vocabulary(self.init)
        model = super().build().model
        if self.init is not None:
            model.load_state_dict(self.init)
        if self.lora:
            add_lora(model, self.cfg)  # A from (train.seed), B = 0: the outputs are SRC's exactly
        return model

    def optimizer(self, params) -> torch.optim.Optimizer:
        return adamw(self.cfg, params, self.ctx.device)

    def build(self) -> Trainee:
        """:meth:`network`, its EMA and the optimiser over what trains."""
        model = self.network()
        ema = copy.deepcopy(model).requires_grad_(False)
        return Trainee(model, model, ema, self.optimizer([p for p in model.parameters() if p.requires_grad]))

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
        """The final samples and next commands; a LoRA run then writes RUN/adapter.safetensors (the EMA's adapters;
        and RUN/pytorch_lora_weights.safetensors where diffusers' load_lora_weights reads them) and closes with
        its size against the full model's."""
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
        theirs = save_diffusers_lora(self.ctx.run_dir, state, cfg, ema.state_dict().keys())
        if theirs is not None:
            print(f"for diffusers (UNet2DConditionModel): {theirs}; pipeline.load_lora_weights(folder) reads it")
