"""What one kind of training adds to the one training loop (:mod:`ddpmlab.training.loop`): a :class:`Task`.

A task builds its networks and optimiser (a :class:`Trainee`), computes one training step's loss from a
batch (:meth:`Task.step`), names the extra state it checkpoints (a teacher, a target network, a
discriminator) and says what to draw or evaluate.  The kinds of training are in
:mod:`ddpmlab.training.tasks`.  Also here: the rules every task shares (the EMA update, the learning-rate
schedule, the per-step random generators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from accelerate import Accelerator

from ddpmlab.config import Config
from ddpmlab.training.monitor import TrainingMonitor


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # exponential moving average of the weights: ema <- decay * ema + (1 - decay) * theta; a frozen weight (a
    # LoRA run's base) never changes, so its average is itself and is passed over
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of training step ``step`` (0-based): linear warm-up over train.warmup_steps, then
    constant (Ho et al. 2020, App. B), or a cosine (Loshchilov & Hutter 2017) or linear decay to 0 at
    train.steps (train.lr_schedule)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    done = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)  # in [0, 1)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return t.lr * (1.0 - done)


def adamw(cfg: Config, params, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` with train.lr, adam_betas and weight_decay; fused (one pass over each tensor instead
    of ~10) on CPU and CUDA."""
    return torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                             weight_decay=cfg.train.weight_decay, fused=device.type in ("cpu", "cuda"))


def step_generators(seed: int, step: int, rank: int, device) -> tuple:
    """Seed everything random in a training step from (seed, step, rank), so a resumed run continues exactly.

    Seeds torch's global generator (dropout) and returns this process's own generator (conditioning
    augmentation) and the one every process shares (t, noise and label dropout of the global batch).
    """
    own_seed = (seed * 1_000_003 + step) * 4099 + rank
    torch.manual_seed(own_seed)
    own = torch.Generator(device=device).manual_seed(own_seed)
    return own, torch.Generator(device=device).manual_seed(own_seed - rank)


@dataclass
class RunContext:
    """Where a task trains: its config, folder, processes and how it reports."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    precision: str  # e.g. "bf16 mixed precision (auto: ...)"
    resume: bool
    progress: bool

    @property
    def main(self) -> bool:  # the process that owns the run folder (logs, pictures, checkpoints)
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Trainee:
    """The networks a task trains: as prepared by Accelerate, unwrapped (the EMA's source), the EMA, the optimiser."""

    model: torch.nn.Module
    raw: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer


@dataclass
class StepOutput:
    loss: torch.Tensor  # the training step's loss on this process (detached), what the guard checks
    values: torch.Tensor  # (len(task.log_values),): the logged values of this training step


class Task:
    """What one kind of training adds to the loop; subclasses override what differs.

    Called in this order: :meth:`load_data` (before the run folder is created: bad data leaves no
    folder), :meth:`build` (networks and optimiser, unprepared), :meth:`load_state` (resume),
    :meth:`prepare` (Accelerate), then per training step :meth:`step` and :meth:`after_update`, and at
    the end :meth:`finish`.
    """

    resume_command = "ddpm train --resume"
    bar_label = "training"
    log_values: Sequence[str] = ("loss",)  # means over the good steps since the last row
    log_status: Sequence[str] = ()  # values as they are at the row (:meth:`status`)
    uses_budget = False  # train.minutes fits the steps (needs drawing_seconds)
    evaluates = False  # train.eval_every: the monitor evaluates the EMA
    precision: Optional[str] = None  # a fixed mixed precision instead of train.mixed_precision

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ctx: Optional[RunContext] = None
        self.trainee: Optional[Trainee] = None
        self.monitor: Optional[TrainingMonitor] = None

    # -- set-up
    def load_data(self) -> None:
        """Read (and check) the data; print what it is on the main process."""

    def build(self) -> Trainee:
        raise NotImplementedError

    def load_state(self, ckpt: dict) -> None:
        """Restore what :meth:`state` and :meth:`weights` saved (the trainee is restored by the loop)."""

    def prepare(self, trainee: Trainee) -> Trainee:
        model, opt = self.ctx.accelerator.prepare(trainee.model, trainee.opt)
        trainee.ema.to(self.ctx.device)
        return Trainee(model, self.ctx.accelerator.unwrap_model(model), trainee.ema, opt)

    def describe(self) -> Optional[str]:
        """The line printed when a new run starts."""
        return None

    def images(self):
        """The data the monitor evaluates against (pixels), or None."""
        return None

    # -- steps
    def total_steps(self) -> int:
        return self.cfg.train.steps

    def batches(self, start: int, stop: int) -> Iterable:
        """This process's batches of training steps start..stop-1."""
        raise NotImplementedError

    def learning_rate(self, step: int) -> float:
        return learning_rate(self.cfg, step)

    def step(self, step: int, batch) -> StepOutput:
        """Forward and backward of training step ``step`` (gradients accumulated, not applied)."""
        raise NotImplementedError

    def clip_gradients(self) -> torch.Tensor:
        """Clip at train.grad_clip (0: only measure); returns the gradient norm before clipping."""
        return self.ctx.accelerator.clip_grad_norm_(self.trainee.model.parameters(),
                                                    self.cfg.train.grad_clip or float("inf"))

    def ema_decay(self, done: int) -> Optional[float]:
        """The EMA decay after training step ``done`` (None: no EMA update at this step)."""
        t = self.cfg.train
        if done % t.ema_every:
            return None
        return 0.0 if done <= t.ema_start else t.ema_decay

    def after_update(self, done: int) -> None:
        """After the weights (and EMA) changed at training step ``done`` (e.g. a target network)."""

    def status(self) -> Dict[str, Any]:
        """The values of :attr:`log_status` as they are now (not averaged), e.g. a distillation round."""
        return {}

    # -- checkpoints
    def state(self) -> dict:
        """JSON state of the task to checkpoint (besides the trainee)."""
        return {}

    def weights(self) -> Dict[str, dict]:
        """Extra networks to checkpoint, name -> state dict (a teacher, a target network, a discriminator)."""
        return {}

    # -- pictures and measurements
    def draw(self, tag: str) -> Optional[Path]:
        """RUN/samples/<tag>.png during training (train.sample_every); None: nothing to draw."""
        return None

    def drawing_seconds(self) -> float:
        return 0.0

    def evaluate(self, done: int, final: bool) -> None:
        """Measure the EMA at training step ``done`` (train.eval_every; ``final``: the last step)."""

    def finish(self, seconds: float, skipped: int) -> None:
        """After the last training step, on the main process: final pictures, measurements, what to try next.
        ``seconds``: this session's training time; ``skipped``: its non-finite steps."""
