"""Distilling a diffusion run into a 1-8 step student: ``ddpm distill RUN --method progressive|consistency``.

* progressive (Salimans & Ho 2022, Algorithm 2): rounds r = 0, 1, ...; in round r the teacher takes
  2M = distill.teacher_steps / 2^r DDIM steps and the student learns to match two of them in one
  (the x-target of :func:`~ddpmlab.samplers.student.progressive_target`, weighted by max(SNR, 1)).
  The first teacher is the teacher run; each later one is the previous round's student (its EMA),
  which also starts the new student, with a fresh optimizer.  It stops at distill.steps.
* consistency (Song et al. 2023, Algorithm 2, with the pseudo-Huber loss, the inverse-step
  weighting and the doubling curriculum of N of Song & Dhariwal 2023): the teacher's ODE step
  (Heun, or Euler = DDIM) from sigma_{n+1} to sigma_n gives the target f_{theta^-}(x_hat_n, sigma_n)
  of the student's f_theta(x_{n+1}, sigma_{n+1}); theta^- is an EMA of theta (distill.target_ema).

A flow teacher (diffusion.process=flow) is distilled by the same two losses through the VP view of its
schedule (:class:`~ddpmlab.samplers.base.ModelPredictor`); its student predicts the velocity as the
teacher does (distill.prediction = velocity, set by ``ddpm distill``), so the network it starts from is
called with the flow's own inputs (x_flow, t T).  Why, and what a step of each student is on the flow:
:mod:`ddpmlab.samplers.student`.

The student run is a folder like a training run (config.yaml with the teacher's config plus the
``distill`` section and ``diffusion.prediction`` = the student's, log.csv, TensorBoard events,
safetensors checkpoints with the student, its EMA, the optimizer and the current teacher or target
network).  Everything random in iteration k comes from (train.seed, k), so a resumed distillation
continues bit for bit.
"""

from __future__ import annotations

import copy
import shlex
from datetime import datetime
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ddpmlab.config import Config, config_from_dict
from ddpmlab.config.load import apply_overrides
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.checkpoint import CONFIG_FILE, load_run_config, require_run_dir
from ddpmlab.runs import Output, Run, SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.guidance import drop_labels
from ddpmlab.samplers.student import (
    abar_of_level,
    consistency_fn,
    curriculum_n,
    ddim_move,
    default_huber_c,
    karras_levels,
    level_time,
    ode_step,
    progressive_target,
    pseudo_huber,
    sigma_range,
    truncated_snr_weight,
    ve_x0,
)
from ddpmlab.training.data import load_data
from ddpmlab.training.loop import run, train_device
from ddpmlab.training.task import StepOutput, Task, Trainee, ema_update
from ddpmlab.viz.samples import reference_points, save_samples

DataFn = Callable[[int, torch.Generator], Tuple[torch.Tensor, Optional[torch.Tensor]]]
# keys `ddpm distill` takes besides distill.*: how the student run is kept and where it goes
TRAIN_KEYS = ("seed", "device", "name", "out_dir", "log_every", "save_every", "keep_checkpoints", "sample_n",
              "tensorboard", "label_dropout")


# ----------------------------------------------------------------------------- schedule of rounds

def round_plan(cfg: Config) -> List[Tuple[int, int]]:
    """[(student steps M, iterations)] of each round: progressive halves distill.teacher_steps down to
    distill.steps; consistency is one round of distill.iterations[0] iterations."""
    ds = cfg.distill
    if ds.method == "consistency":
        return [(ds.steps, ds.iterations[0])]
    plan, m, r = [], ds.teacher_steps // 2, 0
    while m >= ds.steps:
        plan.append((m, ds.iterations[min(r, len(ds.iterations) - 1)]))
        m, r = m // 2, r + 1
    return plan


def round_of(plan: List[Tuple[int, int]], k: int) -> Tuple[int, int]:
    """(round, the iteration at which it starts) of iteration k."""
    start = 0
    for r, (_, n) in enumerate(plan):
        if k < start + n:
            return r, start
        start += n
    return len(plan) - 1, start - plan[-1][1]


def iteration_generator(seed: int, k: int, rank: int = 0) -> torch.Generator:
    """The generator of everything random in training step k of process ``rank`` (data, labels, t, noise);
    dropout via the global seed.  Each process draws its own examples of the global batch."""
    s = seed * 1_000_003 + k + rank * 2**40
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


# ----------------------------------------------------------------------------- the two losses

def progressive_loss(student_predict, teacher_predict, schedule: NoiseSchedule, x0: torch.Tensor, m: int,
                     gen: torch.Generator) -> torch.Tensor:
    """Salimans & Ho 2022, Algorithm 2 for a student of m steps (teacher 2m): the weighted x-loss (scalar)."""
    b, dev = x0.shape[0], x0.device
    shape = (-1,) + (1,) * (x0.ndim - 1)
    i = torch.randint(1, m + 1, (b,), generator=gen).to(torch.float64)  # t = i / m, i ~ Cat[1..m]
    t, t1, t2 = (level_time(schedule, u) for u in (i / m, (i - 0.5) / m, (i - 1) / m))
    a_t, a_1, a_2 = (abar_of_level(schedule, s).to(dev, x0.dtype).reshape(shape) for s in (t, t1, t2))
    eps = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
    z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    with torch.no_grad():  # two DDIM steps of the teacher: t -> t - 0.5/m -> t - 1/m
        z1 = ddim_move(z, teacher_predict(z, t.to(dev))[1], a_t, a_1)
        x1 = teacher_predict(z1, t1.clamp(min=0).to(dev))[1]
        z2 = torch.where(a_1 >= 1, z1, ddim_move(z1, x1, a_1, a_2))
        target = progressive_target(z, z2, a_t, a_2)
    x_hat = student_predict(z, t.to(dev))[1]
    w = truncated_snr_weight(a_t).reshape(-1)
    return (w * (target - x_hat).pow(2).flatten(1).mean(1)).mean()


def consistency_loss(student_predict, target_predict, teacher_predict, schedule: NoiseSchedule, x0: torch.Tensor,
                     n_levels: int, cfg, gen: torch.Generator) -> torch.Tensor:
    """Song et al. 2023, Algorithm 2 (consistency distillation) with the pseudo-Huber metric (scalar)."""
    ds = cfg.distill
    b, dev = x0.shape[0], x0.device
    shape = (-1,) + (1,) * (x0.ndim - 1)
    smin, smax = sigma_range(schedule)
    sig = karras_levels(smin, smax, n_levels, ds.rho)  # increasing, (N,)
    n = torch.randint(0, n_levels - 1, (b,), generator=gen)
    s_lo, s_hi = sig[n].to(dev), sig[n + 1].to(dev)
    z = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
    x_hi = x0 + s_hi.to(x0.dtype).reshape(shape) * z  # VE: x_{n+1} = x + sigma_{n+1} z
    with torch.no_grad():
        x_lo = ode_step(lambda x, s: ve_x0(teacher_predict, x, s), x_hi, s_hi, s_lo, ds.solver)
        f_target = consistency_fn(target_predict, x_lo, s_lo, smin, ds.sigma_data)
    f = consistency_fn(student_predict, x_hi, s_hi, smin, ds.sigma_data)
    c = ds.huber_c if ds.huber_c is not None else default_huber_c(x0[0].numel())
    w = 1.0 / (s_hi - s_lo) if ds.weighting == "inverse_step" else torch.ones_like(s_hi)
    return (w.to(x0.dtype) * pseudo_huber(f, f_target, c)).mean()


# ----------------------------------------------------------------------------- the task

def _frozen(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


def distill(cfg: Config, teacher: nn.Module, teacher_prediction: str, student: nn.Module, schedule: NoiseSchedule,
            data: DataFn, run_dir, *, resume: bool = False, progress: bool = True, stop_after: Optional[int] = None,
            num_classes: int = 0, sample_reference: Optional[torch.Tensor] = None,
            write_samples: bool = True) -> Path:
    """Distill ``teacher`` (a denoiser ``model(x_t, t, y)`` of parameterisation ``teacher_prediction``) into
    ``student`` as ``cfg.distill`` says; the run folder ``run_dir`` gets config, log, checkpoints, samples.

    data(n, generator) -> (x0 (n, ...), labels (n,) or None): training examples.  ``resume``: continue
    from the newest loadable checkpoint of ``run_dir``.  ``stop_after``: save and stop after this many
    training steps in all (the rest on resume).  ``num_classes`` > 0: labels go to teacher and student,
    dropped to "no label" with probability train.label_dropout (classifier-free guidance).
    """
    task = DistillTask(cfg, teacher, teacher_prediction, student, schedule, data, num_classes=num_classes,
                       sample_reference=sample_reference, write_samples=write_samples)
    return run(task, Path(run_dir), resume, progress, stop_after=stop_after)


class DistillTask(Task):
    """Progressive or consistency distillation as a task of the training loop: the student is the trainee
    (with its EMA, Adam at distill.lr); the teacher, the current round's teacher (progressive) or the
    target network theta^- (consistency) are the task's.  Computed in fp32."""

    resume_command = "ddpm distill --resume"
    log_status = ("round",)
    precision = "no"

    def __init__(self, cfg: Config, teacher: nn.Module, teacher_prediction: str, student: nn.Module,
                 schedule: NoiseSchedule, data: DataFn, num_classes: int = 0,
                 sample_reference: Optional[torch.Tensor] = None, write_samples: bool = True):
        super().__init__(cfg)
        self.teacher, self.teacher_prediction, self.student = teacher, teacher_prediction, student
        self.schedule, self.data, self.num_classes = schedule, data, num_classes
        self.sample_reference, self.write_samples = sample_reference, write_samples
        self.plan = round_plan(cfg)
        self.bar_label = f"distilling ({cfg.distill.method})"
        self.round = 0
        self.round_teacher: Optional[nn.Module] = None  # progressive: this round's teacher (None: the teacher)
        self.target: Optional[nn.Module] = None  # consistency: theta^-, an EMA of the student

    def build(self) -> Trainee:
        ds, device, world = self.cfg.distill, self.ctx.device, self.ctx.accelerator.num_processes
        if ds.batch_size % world:
            raise ConfigError(f"distill.batch_size ({ds.batch_size}) must be divisible by the number of processes "
                              f"({world})")
        student = self.student.to(device).train()
        self.teacher = _frozen(self.teacher).to(device)
        if ds.method == "consistency":
            self.target = _frozen(student)
        return Trainee(student, student, _frozen(student), torch.optim.Adam(student.parameters(), lr=ds.lr))

    def load_state(self, ckpt: dict) -> None:
        extra = ckpt["weights"].get("extra")
        if extra is None:
            return
        net = self.target if self.target is not None else _frozen(self.student)
        net.load_state_dict(extra)
        if self.target is None:
            self.round_teacher = net

    def state(self) -> dict:
        return {"distill": {"round": self.round, "method": self.cfg.distill.method}}

    def weights(self) -> dict:
        # the current teacher (progressive, after round 0) or the target network travels with the checkpoint
        net = self.target if self.target is not None else self.round_teacher
        return {} if net is None else {"extra": net.state_dict()}

    def total_steps(self) -> int:
        return sum(n for _, n in self.plan)

    def batches(self, start: int, stop: int):
        return range(start, stop)  # each training step draws its examples from its own generator

    def learning_rate(self, step: int) -> float:
        return self.cfg.distill.lr

    def status(self) -> dict:
        return {"round": self.round}

    def step(self, step: int, batch) -> StepOutput:
        """One training step of the student (a new progressive round first makes the student its teacher)."""
        cfg, ds, acc = self.cfg, self.cfg.distill, self.ctx.accelerator
        self.round, r_start = round_of(self.plan, step)
        if ds.method == "progressive" and step == r_start and self.round > 0:
            self.round_teacher = _frozen(self.trainee.ema)
            self.trainee.raw.load_state_dict(self.trainee.ema.state_dict())
            self.trainee.opt.state.clear()  # a fresh optimiser for the new round
        gen = iteration_generator(cfg.train.seed, step, acc.process_index)
        x0, y = self.data(ds.batch_size // acc.num_processes, gen)
        x0 = x0.to(self.ctx.device)
        if self.num_classes and y is not None:
            y = drop_labels(torch.as_tensor(y).long(), cfg.train.label_dropout, self.num_classes,
                            generator=gen).to(self.ctx.device)
        else:
            y = None
        student = ModelPredictor(self.trainee.model, self.schedule, ds.prediction, y=y)
        if ds.method == "progressive":
            teacher = self.round_teacher or self.teacher
            prediction = self.teacher_prediction if self.round_teacher is None else ds.prediction
            loss = progressive_loss(student, ModelPredictor(teacher, self.schedule, prediction, y=y), self.schedule,
                                    x0, self.plan[self.round][0], gen)
        else:
            teacher = ModelPredictor(self.teacher, self.schedule, self.teacher_prediction, y=y)
            target = ModelPredictor(self.target, self.schedule, ds.prediction, y=y)
            n_levels = curriculum_n(step, self.total_steps(), ds.n_start, ds.n_end)
            loss = consistency_loss(student, target, teacher, self.schedule, x0, n_levels, cfg, gen)
        acc.backward(loss)
        return StepOutput(loss.detach(), loss.detach().reshape(1))

    def clip_gradients(self) -> torch.Tensor:
        return self.ctx.accelerator.clip_grad_norm_(self.trainee.model.parameters(), float("inf"))  # measured only

    def ema_decay(self, done: int) -> float:
        k = done - 1
        ema_k = k - round_of(self.plan, k)[1] if self.cfg.distill.method == "progressive" else k
        return min(self.cfg.distill.ema_decay, (1 + ema_k) / (10 + ema_k))

    def after_update(self, done: int) -> None:
        if self.target is not None:
            ema_update(self.target, self.trainee.raw, self.cfg.distill.target_ema)  # theta^- <- mu theta^- + ...

    def finish(self, seconds: float, skipped: int) -> None:
        if not self.write_samples:
            return
        cfg, ema = self.cfg, self.trainee.ema
        run_ = Run(cfg, ema.eval(), self.schedule, self.ctx.device, self.ctx.run_dir)
        plan = plan_request(run_, SamplingRequest("student", n=cfg.train.sample_n, seed=cfg.train.seed),
                            log=lambda m: None)
        x = draw_samples(run_, plan, cfg.train.sample_n, seed=cfg.train.seed, progress=False)
        out = Output(self.ctx.run_dir / "samples" / "final.png", is_folder=False)
        png = save_samples(run_, x, out, title=f"{cfg.distill.method} student, {plan.steps} steps",
                           reference=self.sample_reference)[0]
        print(f"done: {self.total_steps()} steps in {seconds:.0f} s; samples ({cfg.distill.steps} student steps) "
              f"-> {png}")
        run_q = shlex.quote(str(self.ctx.run_dir))
        print(f"next:\n  ddpm sample {run_q}\n  ddpm eval {run_q}")

# ----------------------------------------------------------------------------- from a teacher run

def student_config(teacher_dir, method: str, steps: Optional[int], overrides: List[str]) -> Config:
    """The config of a new student of the run ``teacher_dir``: its config, the ``distill`` section
    (method, steps, key=value overrides of distill.* and a few train.* keys) and the student's prediction."""
    teacher_dir = require_run_dir(teacher_dir)
    tcfg = load_run_config(teacher_dir)
    stage = getattr(tcfg, "stage", "diffusion")
    if stage != "diffusion":
        raise DDPMError(f"'{teacher_dir}' is a {stage} run, not a diffusion run: ddpm distill needs a run of "
                        "`ddpm train` (a denoiser) as its teacher")
    if tcfg.distill.teacher is not None:
        raise DDPMError(f"'{teacher_dir}' is itself a distilled student (of {tcfg.distill.teacher}); distill its "
                        "teacher instead")
    d = tcfg.to_dict()
    d["distill"].update(teacher=str(teacher_dir), method=method)
    flow = tcfg.diffusion.process == "flow"
    if flow:  # a flow's network predicts the velocity at (x_flow, t T): its student reads it the same way
        d["distill"]["prediction"] = "velocity"
    d["train"]["name"] = None  # the student's folder is its own, never the teacher's
    if steps is not None:
        d["distill"]["steps"] = steps
    for section in ("finetune", "lora"):  # a fine-tuned teacher's weights are its own now (adapters baked in)
        d.pop(section, None)
    apply_overrides(d, overrides, _student_key, lambda key: (
        f"command line: {key} cannot change in a distillation (the student keeps its teacher's model and "
        f"diffusion); it takes distill.* and train.{{{','.join(TRAIN_KEYS)}}}"), "distill.iterations=[1000]")
    _check_student_prediction(teacher_dir, flow, d["distill"]["prediction"])
    d["diffusion"]["prediction"] = d["distill"]["prediction"]  # how sampling reads the student's output
    return config_from_dict(d, source=f"{teacher_dir}/{CONFIG_FILE} + command line")


def _student_key(key: str) -> bool:
    """Whether ``ddpm distill`` takes the key ``key`` on its command line."""
    section, _, name = key.partition(".")
    return section == "distill" or (section == "train" and name in TRAIN_KEYS)


def _check_student_prediction(teacher_dir, flow: bool, prediction: str) -> None:
    """A ConfigError unless the student's parameterisation fits its teacher: velocity for a flow, v or x0 else."""
    if flow and prediction != "velocity":
        raise ConfigError(f"command line: distill.prediction={prediction}: '{teacher_dir}' is a flow run, whose "
                          "student predicts the velocity like its teacher; drop distill.prediction or set it to "
                          "velocity")
    if not flow and prediction == "velocity":
        raise ConfigError(f"command line: distill.prediction=velocity is the student of a flow run; '{teacher_dir}' "
                          "is a DDPM run: set distill.prediction to v or x0")


def _dataset_sampler(dataset) -> DataFn:
    def draw(n: int, gen: torch.Generator):
        idx = torch.randint(len(dataset), (n,), generator=gen).tolist()
        items = [dataset[i] for i in idx]
        x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
        y = torch.as_tensor([int(it[1]) for it in items]) if len(items[0]) > 1 and items[0][1] is not None else None
        return x, y

    return draw


def distill_run(teacher_dir=None, method: str = "progressive", steps: Optional[int] = None,
                overrides: Optional[List[str]] = None, resume_dir=None, progress: bool = True) -> Path:
    """``ddpm distill``: a new student run of ``teacher_dir`` (or ``resume_dir`` continued); its folder."""
    if resume_dir is not None:
        run_dir = require_run_dir(resume_dir)
        cfg = load_run_config(run_dir)
        if cfg.distill.teacher is None:
            raise DDPMError(f"'{run_dir}' is not a distilled student (no distill.teacher in its {CONFIG_FILE}); "
                            "continue a training run with ddpm train --resume")
    else:
        cfg = student_config(teacher_dir, method, steps, overrides or [])
        name = cfg.train.name or (f"{Path(teacher_dir).name}-{method}{cfg.distill.steps}-"
                                  f"{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        run_dir = Path(cfg.train.out_dir) / name if cfg.train.name else Path(teacher_dir).parent / name
    teacher_run = load_run(cfg.distill.teacher, "ema", train_device(cfg.train.device))
    dataset = load_data(teacher_run.cfg)
    ref = None if teacher_run.is_image else reference_points(dataset)
    print(f"distilling {cfg.distill.teacher} ({teacher_run.checkpoint}, EMA) into a {cfg.distill.steps}-step "
          f"{cfg.distill.method} student: {run_dir}")
    return distill(cfg, teacher_run.model, teacher_run.cfg.diffusion.prediction, copy.deepcopy(teacher_run.model),
                   teacher_run.schedule, _dataset_sampler(dataset), run_dir, resume=resume_dir is not None,
                   progress=progress, num_classes=teacher_run.num_classes, sample_reference=ref)
