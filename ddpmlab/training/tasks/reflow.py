"""Reflow (Liu et al. 2023, "Flow Straight and Fast", Algorithm 1): ``ddpm reflow TEACHER_RUN``.

A flow run's ODE couples each noise z with a sample x = ODE(z).  Flow matching on those fixed pairs,
x_t = (1 - t) x + t z with the target velocity z - x (Liu et al. 2023, Eq. 1 on the coupling (z, x); the loss
of :class:`~ddpmlab.diffusion.objectives.FlowObjective` with eps = z), learns a flow with the same marginals
whose paths are straighter (the straightness of :mod:`ddpmlab.evaluate.straightness` falls), so that one or
two Euler steps land near where the teacher's many steps do.

1. The teacher's deterministic ODE sampler (its own sampler, steps and guidance unless reflow.* say
   otherwise) draws reflow.pairs pairs into RUN/pairs, in chunks a resumed run does not draw again
   (:mod:`ddpmlab.training.pairs`).
2. A network initialised from the teacher's EMA weights trains on them on the one loop (checkpoints, resume,
   EMA, logging, evaluation): :class:`ReflowTask` is the task of ``ddpm train`` with the pairs as its data.

The result is an ordinary flow run: the teacher's config with the ``reflow`` section, drawing its samples,
and sampled by ``ddpm sample RUN``, with one Euler step (train.sample_sampler flow_euler, sample_steps 1).
Two steps at t = 1, 1/2, 0 (Liu et al.'s uniform Euler steps) are ``--steps 2 --step-schedule trailing``: the
``flow`` step schedule's two are t = 1, 1/T, 0, about one.  A class-conditional teacher's pairs keep their
labels and carry its guidance, so the reflowed run samples without (train.sample_guidance null).
"""

from __future__ import annotations

import shlex
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Sequence

from ddpmlab.config import Config, config_from_dict
from ddpmlab.config.load import apply_overrides
from ddpmlab.data.latents import LATENTS_FILE
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.checkpoint import CONFIG_FILE, load_run_config, require_run_dir
from ddpmlab.models import count_parameters
from ddpmlab.runs import Run, load_run
from ddpmlab.runs.load import read_latents_record
from ddpmlab.samplers.guidance import drop_labels
from ddpmlab.training.data import load_data, step_loader
from ddpmlab.training.distributed import draw_uniform, own_rows
from ddpmlab.training.loop import run, train_device
from ddpmlab.training.pairs import PAIRS_DIR, draw_pairs, load_pairs, pair_plan, pair_sampling
from ddpmlab.training.run_folder import resume_derived
from ddpmlab.training.task import StepOutput, Trainee, step_generators
from ddpmlab.training.tasks.diffusion import DiffusionTask

# keys `ddpm reflow` takes besides reflow.* and train.*: the loss and how its training times are drawn
DIFFUSION_KEYS = ("t_sampling", "logit_normal_mean", "logit_normal_std", "mode_scale", "loss")


class ReflowTask(DiffusionTask):
    """Reflow as a task of the training loop: ``ddpm train``'s task (network, EMA, AdamW, the flow loss, the
    drawings and evaluations) on the teacher's (noise, sample) pairs, drawn when the network is built."""

    resume_command = "ddpm reflow --resume"
    bar_label = "reflow"
    uses_budget = False  # the pairs take their own time: the run trains train.steps

    def __init__(self, cfg: Config, teacher: Run, init: Optional[dict] = None):
        super().__init__(cfg)
        self.teacher, self.init = teacher, init
        self.from_teacher = init is not None
        self.plan = self.pairs = None

    def load_data(self) -> None:
        """The teacher's data, which the drawings and evaluations compare against (the pairs are what trains)."""
        self.dataset = self.pixels = load_data(self.cfg)
        self.plan = pair_plan(self.teacher, self.cfg)
        tdir = self.teacher.dir
        if self.cfg.model.autoencoder and tdir is not None and (tdir / LATENTS_FILE).is_file():
            self.latents = read_latents_record(tdir)  # the reflowed run samples the teacher's latents

    def build(self) -> Trainee:
        """The pairs (the missing chunks drawn), then the network, from the teacher's EMA weights (``init``)."""
        ctx, rf = self.ctx, self.cfg.reflow
        acc = ctx.accelerator
        drawn = draw_pairs(self.teacher, self.plan, self.cfg, ctx.run_dir, rank=acc.process_index,
                           world=acc.num_processes, progress=ctx.progress and ctx.main)
        acc.wait_for_everyone()
        self.pairs = load_pairs(self.cfg, self.plan, ctx.run_dir, self.teacher.shape)
        if ctx.main:
            print(f"pairs: {rf.pairs} (noise, sample) pairs of the teacher's {self.plan.describe()}"
                  f"{'' if self.plan.guidance is None else f', guidance {self.plan.guidance:g}'} in "
                  f"{ctx.run_dir / PAIRS_DIR} ({drawn} drawn now{', the rest earlier' * (drawn < rf.pairs)})")
        trainee = super().build()
        if self.init is not None:
            trainee.model.load_state_dict(self.init)
            trainee.ema.load_state_dict(self.init)
        return trainee

    def describe(self) -> str:
        start = "the teacher's EMA weights" if self.from_teacher else f"fresh weights (seed {self.cfg.train.seed})"
        return (f"reflow {self.ctx.run_dir}: {count_parameters(self.trainee.raw) / 1e6:.2f}M parameters from "
                f"{start}, {len(self.pairs)} pairs, {self.cfg.train.steps} steps on {self.ctx.device} "
                f"x{self.ctx.accelerator.num_processes}, {self.ctx.precision}")

    def batches(self, start: int, stop: int):
        return step_loader(self.pairs, self.cfg, start, stop, self.ctx.accelerator)

    def step(self, step: int, batch) -> StepOutput:
        """Flow matching on the fixed pairs: x_t = (1 - t) x + t z, target z - x (Liu et al. 2023, Eq. 1 on the
        coupling (z, x)); t drawn as the run's diffusion.t_sampling says, labels dropped as in ``ddpm train``."""
        cfg, acc, device = self.cfg, self.ctx.accelerator, self.ctx.device
        x, z, y = (b.to(device, non_blocking=True) for b in batch)
        _, shared = step_generators(cfg.train.seed, step, acc.process_index, device)  # seeds dropout too
        t = self.objective.sample_timesteps(cfg.train.batch_size, device=device, generator=shared)
        t = t[own_rows(len(x), acc.process_index)]
        if cfg.model.num_classes:  # classifier-free guidance's "no label", drawn as ddpm train draws it
            u = draw_uniform(len(y), cfg.train.batch_size, acc.process_index, shared)
            y = drop_labels(y, cfg.train.label_dropout, cfg.model.num_classes, u=u)
        else:
            y = None
        loss = self.backward_micro_batches(x, t, z, y)
        return StepOutput(loss, loss.reshape(1))

    def finish(self, seconds: float, skipped: int) -> None:
        super().finish(seconds, skipped)
        print(f"  ddpm sample {shlex.quote(str(self.ctx.run_dir))} --sampler flow_euler --steps 2 "
              "--step-schedule trailing")


def reflow(cfg: Config, teacher: Run, run_dir, *, init: Optional[dict] = None, resume: bool = False,
           progress: bool = True, stop_after: Optional[int] = None) -> Path:
    """Reflow ``teacher`` (a flow run, or any flow network wrapped in a :class:`~ddpmlab.runs.Run`) as ``cfg``
    says into ``run_dir``; ``init``: the state dict the new network starts from (the teacher's EMA weights;
    None: fresh weights of train.seed).  ``resume``: continue ``run_dir`` (missing pairs, then training);
    ``stop_after``: save and stop after this many training steps in all."""
    if cfg.diffusion.process != "flow":
        raise ConfigError(f"reflow trains a flow (diffusion.process flow), not a {cfg.diffusion.process} run")
    return run(ReflowTask(cfg, teacher, init), Path(run_dir), resume, progress, stop_after=stop_after)


# ----------------------------------------------------------------------------- from a teacher run

def check_teacher(tcfg: Config, teacher_dir: Path) -> None:
    """Refuse, in one line, a teacher reflow cannot retrain: anything but a flow run of ``ddpm train``."""
    stage, process = getattr(tcfg, "stage", "diffusion"), tcfg.diffusion.process
    if stage != "diffusion" or process != "flow":
        kind = f"an {stage} run" if stage != "diffusion" else f"a {process} run"
        raise DDPMError(f"'{teacher_dir}' is {kind}, not a flow run: ddpm reflow retrains a flow run on its own "
                        "(noise, sample) pairs; train one with diffusion.process=flow diffusion.prediction=velocity")
    if tcfg.distill.teacher is not None:
        raise DDPMError(f"'{teacher_dir}' is a distilled student (of {tcfg.distill.teacher}); reflow its teacher")
    if tcfg.model.condition != "none":
        raise DDPMError(f"'{teacher_dir}' is a super-resolution run (model.condition={tcfg.model.condition}); "
                        "reflow pairs noise with samples of a run that needs no conditioning image")


def _reflow_key(key: str) -> bool:
    """Whether ``ddpm reflow`` takes the key ``key`` on its command line."""
    section, _, name = key.partition(".")
    return key not in ("reflow.teacher", "train.minutes") and (
        section in ("reflow", "train") or (section == "diffusion" and name in DIFFUSION_KEYS))


def reflow_config(teacher_dir, pairs: Optional[int] = None, steps: Optional[int] = None,
                  overrides: Sequence[str] = ()) -> Config:
    """The config of a reflow of the run ``teacher_dir``: its config, the ``reflow`` section (--pairs, --steps,
    key=value overrides of reflow.*, train.* and diffusion's time sampling, the pairs' sampler, steps and
    guidance resolved) and one-step Euler drawings."""
    teacher_dir = require_run_dir(teacher_dir)
    tcfg = load_run_config(teacher_dir)
    check_teacher(tcfg, teacher_dir)
    d = tcfg.to_dict()
    # a reflow teacher's pairs, sampler and steps carry over; its guidance is in its pairs already
    d["reflow"].update(teacher=str(teacher_dir), guidance=None)
    d["train"].update(name=None, minutes=None, sample_sampler="flow_euler", sample_steps=1, sample_guidance=None,
                      eval_sampler="flow_euler", eval_steps=1)
    for section in ("finetune", "lora"):  # a fine-tuned teacher's weights are its own now (adapters baked in)
        d.pop(section, None)
    apply_overrides(d, overrides, _reflow_key, lambda key: (
        f"command line: {key} cannot change in a reflow (it keeps its teacher's model, data and process, and trains "
        f"train.steps); it takes reflow.* (not teacher), train.* (not minutes) and "
        f"diffusion.{{{','.join(DIFFUSION_KEYS)}}}"), "reflow.pairs=20000")
    d["reflow"].update({k: v for k, v in (("pairs", pairs), ("steps", steps)) if v is not None})
    cfg = config_from_dict(d, source=f"{teacher_dir}/{CONFIG_FILE} + command line")
    cfg.reflow.sampler, cfg.reflow.steps, cfg.reflow.guidance = pair_sampling(cfg, tcfg)  # as the pairs are drawn
    return cfg


def reflow_run(teacher_dir=None, pairs: Optional[int] = None, steps: Optional[int] = None,
               overrides: Optional[List[str]] = None, resume_dir=None, progress: bool = True,
               stop_after: Optional[int] = None) -> Path:
    """``ddpm reflow``: a new reflow of the run ``teacher_dir`` beside it (or ``resume_dir`` continued, with
    the key=value changes a resumed ``ddpm train`` takes); its folder."""
    overrides = list(overrides or [])
    if resume_dir is not None:
        run_dir, cfg = resume_derived(resume_dir, overrides, "reflow.teacher", "reflow")
    else:
        cfg = reflow_config(teacher_dir, pairs, steps, overrides)
        name = cfg.train.name or f"{Path(teacher_dir).name}-reflow-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.train.out_dir) / name if cfg.train.name else Path(teacher_dir).parent / name
    teacher = load_run(cfg.reflow.teacher, "ema", train_device(cfg.train.device))
    plan = pair_plan(teacher, cfg)  # a sampler, steps or guidance the teacher cannot take fails before any folder
    print(f"reflow of {cfg.reflow.teacher} ({teacher.checkpoint}, EMA; pairs by {plan.describe()}): {run_dir}")
    return reflow(cfg, teacher, run_dir, init=teacher.model.state_dict(), resume=resume_dir is not None,
                  progress=progress, stop_after=stop_after)
