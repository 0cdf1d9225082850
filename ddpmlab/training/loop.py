"""The training loop (Ho et al. 2020, Algorithm 1) on HF Accelerate.

One process or many (``accelerate launch`` / ``torchrun``): each process draws its
slice of the global batch (in ``train.grad_accum_steps`` micro-batches, see
:mod:`ddpmlab.training.distributed`).  Everything random in a step is derived from ``(seed, step)``
(data order, t, noise: the same for any number of processes) and the rank (dropout,
label dropout), so a run resumed from a checkpoint continues bit for bit as if it had
never stopped.
"""

from __future__ import annotations

import contextlib
import csv
import math
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import broadcast

from ddpmlab.config import Config
from ddpmlab.evaluate.superres import save_comparison, spread_images
from ddpmlab.io.checkpoint import (
    require_run_dir,
    save_checkpoint,
    save_run_config,
)
from ddpmlab.models.conditioned import bind_condition, condition_from_high_res, low_res, training_condition
from ddpmlab.runs import Output, Run, draw_samples, plan_sampling
from ddpmlab.samplers.guidance import drop_labels
from ddpmlab.samplers.registry import get_sampler
from ddpmlab.training.budget import PROBE_END, PROBE_START, Budget
from ddpmlab.training.distributed import (
    draw_t_and_noise,
    draw_uniform,
    micro_batches,
    process_state,
    scaler_state,
)
from ddpmlab.training.guard import optimizer_step
from ddpmlab.training.lock import RunLock
from ddpmlab.training.posthoc_ema import save_snapshot
from ddpmlab.training.setup import TrainState, new_run_dir, set_up
from ddpmlab.viz.samples import reference_points, save_samples

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "it_per_s", "time_s", "skipped"]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # exponential moving average of the weights: ema <- decay * ema + (1 - decay) * theta
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over train.warmup_steps, then
    constant (Ho et al. 2020, App. B), or a cosine (Loshchilov & Hutter 2017) or linear decay to
    0 at train.steps (train.lr_schedule)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    done = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)  # in [0, 1)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return t.lr * (1.0 - done)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _draw_train_samples(cfg, ema, schedule, dataset, run_dir: Path, device, steps: Optional[int] = None):
    """(run, samples, truth) of the EMA weights, planned as every front end plans a sampler call (the run's
    own variance for ddpm; a conditional run's samples cycle through the classes; a super-resolution
    run upscales images spread over its data, whose originals are ``truth``; else truth is None).
    ``steps``: instead of train.sample_steps (the budget's timing)."""
    run = Run(cfg, ema, schedule, torch.device(device), run_dir)
    names = {"sampler": "train.sample_sampler", "steps": "train.sample_steps"}
    truth = spread_images(dataset, cfg.train.sample_n) if cfg.model.condition != "none" else None
    n = cfg.train.sample_n if truth is None else len(truth)
    plan = plan_sampling(run, cfg.train.sample_sampler, steps or cfg.train.sample_steps, n, seed=cfg.train.seed,
                         cycle_classes=True, names=names, log=lambda m: None,
                         cond=None if truth is None else condition_from_high_res(truth, cfg))
    return run, draw_samples(run, plan, n, seed=cfg.train.seed, progress=False), truth


def _write_samples(cfg, ema, schedule, dataset, run_dir: Path, tag: str, device) -> Path:
    """RUN/samples/<tag>.png from the EMA weights (:func:`_draw_train_samples`); super-resolution
    runs: triples of input, upscale, truth."""
    run, x, truth = _draw_train_samples(cfg, ema, schedule, dataset, run_dir, device)
    if truth is not None:
        return save_comparison(run_dir / "samples" / f"{tag}.png", low_res(truth, cfg), x, truth)
    ref = None if dataset.is_image else reference_points(dataset)
    output = Output(run_dir / "samples" / f"{tag}.png", is_folder=False)
    return save_samples(run, x, output, title=f"samples at {tag}", reference=ref)[0]


def train(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False, progress: bool = True) -> Path:
    """Train a denoiser as configured; return the run directory.

    ``resume=True`` continues ``run_dir`` from its newest loadable checkpoint.
    The run directory is locked (RUN/.lock) while training: a second process refuses.
    """
    get_sampler(cfg.train.sample_sampler, where="train.sample_sampler")  # fails now, not after the last step
    run_dir = require_run_dir(run_dir) if resume else Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    started = time.time()  # train.minutes counts from here: set-up, training and the final samples
    with RunLock(run_dir, enabled=process_state(cfg.train.device).is_main_process):
        return run_loop(set_up(cfg, run_dir, resume, progress), started)


@dataclass
class StepResult:
    loss: torch.Tensor  # this process's loss of the step (the mean over its micro-batches)
    lr: float
    grad_norm: torch.Tensor  # before clipping
    ok: bool  # the weights changed (False: a non-finite loss or gradient, skipped)


def run_loop(s: TrainState, started: Optional[float] = None) -> Path:
    """Algorithm 1's repeat ... until converged: one train_step per batch, then the end-of-step work."""
    budget = Budget(s.cfg.train.minutes, s.t0 if started is None else started, s.start, s.cfg.train.sample_every)
    s.max_steps = s.cfg.train.steps  # train.minutes fits the steps under this
    log_path = s.run_dir / "log.csv"
    with _StopFlag() as stop, open(log_path, "a", newline="") if s.main else contextlib.nullcontext() as log:
        if s.main and s.start == 0:
            csv.writer(log).writerow(LOG_FIELDS)
        s.model.train()
        for step, (x0, y) in enumerate(s.loader, start=s.start):
            result = train_step(s, step, x0, y)
            fit_budget(s, budget, step + 1)
            if after_step(s, step + 1, result, log, stop):
                return s.run_dir
            if step + 1 >= s.cfg.train.steps:  # train.minutes may have shortened the run
                break
    finish(s)
    return s.run_dir


def train_step(s: TrainState, step: int, x0: torch.Tensor, y: torch.Tensor) -> StepResult:
    """One optimizer step of Algorithm 1 (Ho et al. 2020) on this process's rows of the global batch."""
    cfg, acc = s.cfg, s.accelerator
    own, shared = step_generators(cfg.train.seed, step, acc.process_index, s.device)
    x0 = x0.to(s.device, non_blocking=True)  # Algorithm 1, line 2: x_0 ~ q(x_0)
    y = y.to(s.device) if cfg.model.num_classes else None
    # lines 3-4: t ~ Uniform({1..T}) (or importance-sampled) and eps ~ N(0, I) for the global batch
    t, noise = draw_t_and_noise(s.objective.sample_timesteps, x0, cfg.train.batch_size, acc.process_index, shared,
                                cfg.diffusion.offset_noise)
    if y is not None:  # classifier-free guidance: some labels become "no label" (drawn as t and eps are)
        u = draw_uniform(len(y), cfg.train.batch_size, acc.process_index, shared)
        y = drop_labels(y, cfg.train.label_dropout, cfg.model.num_classes, u=u)
    cond = training_condition(x0, cfg, generator=own)  # super-resolution (SR3): x0's low-res version, upsampled
    lr = learning_rate(cfg, step)
    for g in s.opt.param_groups:
        g["lr"] = lr
    loss = backward_micro_batches(s, x0, t, noise, y, cond)  # line 5: the gradient of the loss, then the step
    # clip at train.grad_clip (0: only measure); a NaN/inf loss or gradient never reaches the weights
    grad_norm = acc.clip_grad_norm_(s.model.parameters(), cfg.train.grad_clip or float("inf"))
    ok = optimizer_step(acc, s.opt, s.guard.check(step, loss, grad_norm, acc))
    s.opt.zero_grad(set_to_none=True)
    done = step + 1
    if ok and done % cfg.train.ema_every == 0:
        ema_update(s.ema, s.raw_model, 0.0 if done <= cfg.train.ema_start else cfg.train.ema_decay)
    if ok and s.power_ema is not None:  # power-function EMAs: beta_t from the step count
        s.power_ema.update(s.raw_model, done)
    return StepResult(loss, lr, grad_norm, ok)


def fit_budget(s: TrainState, budget: Budget, done: int) -> None:
    """train.minutes: fix train.steps to what fits (at PROBE_END, then refitted as the run goes; every
    process takes the main process's figure) and write it to RUN/config.yaml."""
    t = s.cfg.train
    fitted = budget.step_done(done, lambda: sampling_seconds(s), s.max_steps)
    if fitted is None:
        return
    fitted = int(broadcast(torch.tensor([fitted], device=s.device), from_process=0).item())
    first = done == PROBE_END
    if fitted == t.steps and not first:
        return
    t.steps = fitted
    s.bar.total = fitted
    s.bar.refresh()
    if s.main:
        save_run_config(s.cfg, s.run_dir)
        if first:
            s.bar.write(f"train.minutes={t.minutes:g}: {fitted} of at most {s.max_steps} steps fit ({budget.step_s:.3f} "
                        f"s per step over steps {PROBE_START}-{PROBE_END}; a drawing of the samples "
                        f"~{budget.sampling_s:.0f} s); refitted every {budget.refit_every} steps")


def sampling_seconds(s: TrainState) -> float:
    """About how long the final samples take: the planned sampler timed with 1 and with 4 steps (the
    difference is the cost of a step, the rest what a call costs once), extrapolated to train.sample_steps."""
    def timed(steps: int) -> float:
        t0 = time.perf_counter()
        _draw_train_samples(s.cfg, s.ema, s.schedule, s.dataset, s.run_dir, s.device, steps=steps)
        return time.perf_counter() - t0

    steps = s.cfg.train.sample_steps
    one = timed(1)
    if steps == 1:
        return one
    per_step = max(timed(4) - one, 0.0) / 3
    return one + per_step * (steps - 1)


def step_generators(seed: int, step: int, rank: int, device) -> tuple:
    """Seed everything random in a step from (seed, step, rank), so a resumed run continues exactly.

    Seeds torch's global generator (dropout) and returns this process's own generator (conditioning
    augmentation) and the one every process shares (t, noise and label dropout of the global batch).
    """
    own_seed = (seed * 1_000_003 + step) * 4099 + rank
    torch.manual_seed(own_seed)
    own = torch.Generator(device=device).manual_seed(own_seed)
    return own, torch.Generator(device=device).manual_seed(own_seed - rank)


def backward_micro_batches(s: TrainState, x0, t, noise, y, cond=None) -> torch.Tensor:
    """Backward of the loss in train.grad_accum_steps micro-batches; returns the step's loss (detached).

    ``cond``: an image-conditioned model's conditioning of x0's rows (None: none)."""
    acc, k = s.accelerator, s.cfg.train.grad_accum_steps
    loss = torch.zeros((), device=s.device)
    for j, (xj, tj, nj, yj, cj) in enumerate(micro_batches(k, x0, t, noise, y, cond)):
        model = s.model if cj is None else bind_condition(s.model, cj)
        # gradient accumulation: the mean of k micro-batch losses; all-reduce after the last only
        with acc.no_sync(s.model) if j < k - 1 else contextlib.nullcontext():
            with acc.autocast():
                part = s.objective(model, xj, t=tj, noise=nj, y=yj) / k
            acc.backward(part)
        loss = loss + part.detach()
    s.objective.end_step()  # importance sampling: the history learns this step's t once, after all k
    return loss


def after_step(s: TrainState, done: int, r: StepResult, log, stop: _StopFlag) -> bool:
    """End-of-step work after step ``done``: log row, sample grid, evaluation, checkpoint; True: stop now."""
    t = s.cfg.train
    if r.ok:
        s.losses.append(r.loss)
    s.bar.update(1)
    if done % t.log_every == 0 or done == t.steps:
        write_log_row(s, log, done, r)
    if t.sample_every and done % t.sample_every == 0 and s.main and done < t.steps:
        png = _write_samples(s.cfg, s.ema, s.schedule, s.dataset, s.run_dir, f"step_{done:07d}", s.device)
        s.monitor.image_file("samples", png, done)
    if s.main:
        s.monitor.maybe_evaluate(done, s.ema, s.schedule, final=done == t.steps)
    stopping = stop.signal is not None
    if done % t.save_every == 0 or done == t.steps or stopping:
        save_state(s, done)
    if s.power_ema is not None and s.main and done % (t.ema_snapshot_every or t.save_every) == 0:
        for sigma, copy_ in zip(s.power_ema.sigma_rels, s.power_ema.copies):
            save_snapshot(s.run_dir, done, sigma, copy_.state_dict())
    if stopping:
        s.bar.close()
        if s.main:
            s.monitor.close()
            print(f"received {stop.signal}: saved checkpoint at step {done}; "
                  f"continue with `ddpm train --resume {s.run_dir}`")
    return stopping


def write_log_row(s: TrainState, log, done: int, r: StepResult) -> None:
    """A row of RUN/log.csv (and TensorBoard): the mean loss over all processes since the last row."""
    mean_loss = s.accelerator.reduce(torch.stack(s.losses).mean(), "mean").item() if s.losses else float("nan")
    skipped = s.guard.take_since_log()
    now = time.time()
    rate = (len(s.losses) + skipped) / max(now - s.t_last, 1e-9)
    s.losses, s.t_last = [], now
    s.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{r.lr:.2e}", refresh=False)
    if s.main:
        grad_norm = float(r.grad_norm)
        csv.writer(log).writerow([done, f"{mean_loss:.6f}", f"{r.lr:.6g}", f"{grad_norm:.4f}", f"{rate:.3f}",
                                  f"{now - s.t0:.1f}", skipped])
        log.flush()
        s.monitor.scalars(done, {"train/loss": mean_loss, "train/lr": r.lr, "train/grad_norm": grad_norm,
                                 "train/it_per_s": rate})


def save_state(s: TrainState, done: int) -> None:
    """The checkpoint of step ``done``: weights, EMA, optimizer, the objective's and the loss scaler's state."""
    _save(s.accelerator, s.run_dir, done, s.raw_model, s.ema, s.opt,
          {"objective": s.objective.state_dict(), **scaler_state(s.accelerator)}, keep=s.cfg.train.keep_checkpoints,
          weights=s.power_ema.state_dicts() if s.power_ema is not None else None)


def finish(s: TrainState) -> None:
    """After the last step: the final samples (EMA), the summary and what to try next."""
    s.bar.close()
    if s.main:
        steps = s.cfg.train.steps
        path = _write_samples(s.cfg, s.ema, s.schedule, s.dataset, s.run_dir, "final", s.device)
        s.monitor.image_file("samples", path, steps)
        s.monitor.close()
        print(f"done: {steps} steps in {time.time() - s.t0:.0f} s; samples (EMA) -> {path}"
              + (f"; {s.guard.total} steps skipped (non-finite loss or gradient)" if s.guard.total else ""))
        print(next_commands(s.run_dir, superres=s.cfg.model.condition != "none", sampler=s.cfg.train.sample_sampler,
                            steps=s.cfg.train.sample_steps))
    s.accelerator.wait_for_everyone()


def next_commands(run_dir: Path, superres: bool = False, sampler: str = "ddim", steps: int = 50) -> str:
    """The commands to try on a finished run: sampling as its final samples were drawn (a super-resolution
    run upscales instead)."""
    run = shlex.quote(str(run_dir))
    first = (f"  ddpm upscale {run} --image low.png" if superres
             else f"  ddpm sample {run} --sampler {sampler} --steps {steps}")
    return "\n".join(["next:", first, f"  ddpm eval {run}", f"  ddpm viz loss {run}"])


# ----------------------------------------------------------------------------- set-up


def _save(accelerator, run_dir, step, model, ema, opt, extra=None, keep: int = 3, weights=None) -> None:
    accelerator.wait_for_everyone()
    if process_state().is_main_process:
        save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), opt.state_dict(), extra=extra,
                        keep=keep, weights=weights)
    accelerator.wait_for_everyone()
