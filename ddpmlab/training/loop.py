"""The one training loop, for every kind of training (Ho et al. 2020, Algorithm 1's "repeat ... until
converged"), on HF Accelerate.

The loop owns what every kind of training needs: the run folder and its lock (taken before anything
in the folder is touched), Accelerate (one process or many, mixed precision), SIGINT/SIGTERM (save,
then stop), RUN/log.csv and TensorBoard, checkpoints and bit-exact resume, the wall-clock budget
(train.minutes), the EMA of the weights (and post-hoc EMA profiles), the guard against non-finite
steps, the progress bar and the periodic work (sample drawings, evaluation).  What differs between
kinds of training is a :class:`Task` (``ddpmlab.training.tasks``): it builds its networks and
optimiser, computes one training step's loss from a batch, names the extra state it checkpoints and
says what to draw or evaluate.

Everything random in a training step is derived from ``(seed, step)`` and the rank, so a run resumed
from a checkpoint continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from ddpmlab.config import Config
from ddpmlab.errors import ConfigError, OptionError
from ddpmlab.evaluate.log import trim_rows
from ddpmlab.io.checkpoint import find_checkpoint, restore_training_state, save_checkpoint, save_run_config
from ddpmlab.progress import progress_bar
from ddpmlab.runs import resolve_device
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.budget import PROBE_END, PROBE_START, Budget
from ddpmlab.training.distributed import (
    check_mixed_precision,
    forget_accelerator_precision,
    load_scaler_state,
    process_state,
    scaler_state,
    use_cpu,
)
from ddpmlab.training.guard import BadStepGuard, optimizer_step
from ddpmlab.training.lock import RunLock
from ddpmlab.training.monitor import TrainingMonitor
from ddpmlab.training.posthoc_ema import PowerEMA, save_snapshot
from ddpmlab.training.precision import describe_precision, resolve_precision
from ddpmlab.training.run_folder import RunLog, create_run_dir, report_resume
from ddpmlab.training.task import RunContext, StepOutput, Task, Trainee, ema_update

TAIL_FIELDS = ["lr", "grad_norm", "it_per_s", "time_s", "skipped"]  # every log row ends with these


def train_device(name: str) -> torch.device:
    """train.device resolved (an unknown or absent device: the message every command gives, naming train.device)."""
    try:
        return resolve_device(name)
    except OptionError as e:
        raise ConfigError(e.named({"device": "train.device"})) from None


def make_accelerator(cfg: Config, precision: Optional[str] = None) -> Tuple[Accelerator, str]:
    """The Accelerator of train.device and ``precision`` (default train.mixed_precision; auto resolved),
    and a line saying which precision and why."""
    dev = cfg.train.device
    device = train_device(dev)
    if ":" in dev:
        raise ConfigError(f"train.device '{dev}': pick the GPU with CUDA_VISIBLE_DEVICES=N and train.device=cuda")
    precision, why = resolve_precision(precision or cfg.train.mixed_precision, device.type)
    check_mixed_precision(precision, dev)
    forget_accelerator_precision()  # a second run in one process may use another precision
    accelerator = Accelerator(cpu=use_cpu(dev), mixed_precision=precision)
    if accelerator.device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    return accelerator, f"{describe_precision(precision)} ({why})"


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current training step."""

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


@dataclass
class LoopState:
    """What the loop carries from step to step."""

    task: Task
    ctx: RunContext
    start: int  # the first training step of this process's session (the checkpoint's step on resume)
    stop_after: Optional[int]  # save and stop after this many training steps (None: train to the end)
    max_steps: int  # the steps as configured (train.minutes fits the run's steps under it)
    bar: Any
    guard: BadStepGuard
    power_ema: Optional[PowerEMA] = None  # train.ema_profiles
    window: list = field(default_factory=list)  # logged values of the good steps since the last row
    t0: float = field(default_factory=time.time)
    t_last: float = field(default_factory=time.time)

    @property
    def end(self) -> int:
        """The training step this session ends at: the task's last, or stop_after."""
        total = self.task.total_steps()
        return total if self.stop_after is None else min(self.stop_after, total)

    @property
    def complete(self) -> bool:
        return self.end == self.task.total_steps()


def run(task: Task, run_dir: Path, resume: bool = False, progress: bool = True, started: Optional[float] = None,
        stop_after: Optional[int] = None) -> Path:
    """Train ``task`` in ``run_dir`` (a new folder, or continued from its newest loadable checkpoint);
    ``stop_after``: save and stop after this many training steps in all (the rest on resume)."""
    started = time.time() if started is None else started  # train.minutes counts from here
    t = task.cfg.train
    with RunLock(run_dir, enabled=process_state(t.device).is_main_process):
        s = set_up(task, Path(run_dir), resume, progress, stop_after)
        fields = ["step", *task.log_values, *task.log_status, *TAIL_FIELDS]
        budget = Budget(t.minutes if task.uses_budget else None, started, s.start, t.sample_every)
        with StopFlag() as stop, RunLog(s.ctx.run_dir / "log.csv", fields, enabled=s.ctx.main) as log:
            stopped = train_steps(s, stop, log, budget)
        if not stopped:
            finish(s)
    return Path(run_dir)


def set_up(task: Task, run_dir: Path, resume: bool, progress: bool, stop_after: Optional[int]) -> LoopState:
    """Accelerator, data, run folder, trainee (restored on resume), reporting."""
    accelerator, precision = make_accelerator(task.cfg, task.precision)
    ctx = task.ctx = RunContext(task.cfg, run_dir, accelerator, precision, resume, progress)
    task.load_data()  # the data first: a missing or unusable dataset must not leave a run folder
    if not resume:
        create_run_dir(task.cfg, run_dir, accelerator, ctx.main)
    trainee = task.build()
    power_ema = PowerEMA(trainee.raw, task.cfg.train.ema_profiles) if task.cfg.train.ema_profiles else None
    start = restore(task, trainee, power_ema) if resume else 0
    task.trainee = task.prepare(trainee)
    if power_ema is not None:
        power_ema.to(ctx.device)
    if ctx.main:
        trim_rows(run_dir / "log.csv", start)
        line = task.describe() if start == 0 else None
        if line:
            print(line)
    total = task.total_steps()
    bar = progress_bar(progress and ctx.main, total=total, initial=start, desc=task.bar_label)
    say = (lambda m: bar.write(m) if hasattr(bar, "write") else print(m)) if ctx.main else (lambda m: None)
    guard = BadStepGuard(task.cfg.train.max_bad_steps, say=say, run_dir=run_dir)
    if ctx.main:  # TensorBoard, and the evaluation every train.eval_every steps
        task.monitor = TrainingMonitor(task.cfg, run_dir, task.images(), start, ctx.device, say=say,
                                       evaluate=task.evaluates)
    return LoopState(task, ctx, start, stop_after, total, bar, guard, power_ema)


def restore(task: Task, trainee: Trainee, power_ema: Optional[PowerEMA]) -> int:
    """Load the newest loadable checkpoint of a resumed run into the trainee and the task; its step."""
    ctx, start = task.ctx, 0
    ckpt_path, ckpt, skipped = find_checkpoint(ctx.run_dir)  # newest loadable, damaged ones listed
    if ckpt is not None:
        restore_training_state(ckpt_path, ckpt, trainee.model, trainee.ema, trainee.opt)
        if power_ema is not None:
            power_ema.load_state_dicts(ckpt["weights"])
        task.load_state(ckpt)
        load_scaler_state(ctx.accelerator, ckpt["state"])  # fp16: the loss scale continues
        start = ckpt["step"]
    if ctx.main:
        report_resume(ctx.run_dir, ckpt_path, start, skipped)
        save_run_config(task.cfg, ctx.run_dir)  # the resolved config, with any changes of this resume
    return start


def train_steps(s: LoopState, stop: StopFlag, log, budget: Budget) -> bool:
    """One training step per batch and the end-of-step work; True when a signal stopped the run."""
    task = s.task
    task.trainee.model.train()
    for step, batch in enumerate(task.batches(s.start, s.end), start=s.start):
        ok, out, lr, grad_norm = train_step(s, step, batch)
        if task.uses_budget:
            fit_budget(s, budget, step + 1)
        if after_step(s, step + 1, ok, out, lr, grad_norm, log, stop):
            return True
        if step + 1 >= s.end:  # train.minutes may have shortened the run
            break
    return False


def train_step(s: LoopState, step: int, batch) -> tuple:
    """One optimiser update: the task's forward and backward, clipping, the guarded step, the EMAs."""
    task, acc, trainee = s.task, s.ctx.accelerator, s.task.trainee
    lr = task.learning_rate(step)
    for g in trainee.opt.param_groups:
        g["lr"] = lr
    out = task.step(step, batch)
    grad_norm = task.clip_gradients()  # a NaN/inf loss or gradient never reaches the weights
    ok = optimizer_step(acc, trainee.opt, s.guard.check(step, out.loss, grad_norm, acc))
    trainee.opt.zero_grad(set_to_none=True)
    done = step + 1
    if ok:
        decay = task.ema_decay(done)
        if decay is not None:
            ema_update(trainee.ema, trainee.raw, decay)
        if s.power_ema is not None:  # power-function EMAs: beta_t from the step count
            s.power_ema.update(trainee.raw, done)
        task.after_update(done)
    return ok, out, lr, grad_norm


def fit_budget(s: LoopState, budget: Budget, done: int) -> None:
    """train.minutes: fix train.steps to what fits (at PROBE_END, then refitted as the run goes; every
    process takes the main process's figure) and write it to RUN/config.yaml."""
    t = s.task.cfg.train
    fitted = budget.step_done(done, s.task.drawing_seconds, s.max_steps)
    if fitted is None:
        return
    fitted = int(broadcast(torch.tensor([fitted], device=s.ctx.device), from_process=0).item())
    first = done == PROBE_END
    if fitted == t.steps and not first:
        return
    t.steps = fitted
    s.bar.total = fitted
    s.bar.refresh()
    if s.ctx.main:
        save_run_config(s.task.cfg, s.ctx.run_dir)
        if first:
            s.bar.write(f"train.minutes={t.minutes:g}: {fitted} of at most {s.max_steps} steps fit "
                        f"({budget.step_s:.3f} s per step over steps {PROBE_START}-{PROBE_END}; a drawing of the "
                        f"samples ~{budget.sampling_s:.0f} s); refitted every {budget.refit_every} steps")


def after_step(s: LoopState, done: int, ok: bool, out: StepOutput, lr: float, grad_norm, log, stop: StopFlag) -> bool:
    """End-of-step work after training step ``done``: log row, sample drawing, evaluation, checkpoint; True: stop."""
    task, t, main = s.task, s.task.cfg.train, s.ctx.main
    last = done >= s.end
    if ok:
        s.window.append(out.values.detach().float())
    s.bar.update(1)
    if done % t.log_every == 0 or last:
        write_log_row(s, log, done, lr, grad_norm)
    if t.sample_every and done % t.sample_every == 0 and main and done < task.total_steps():
        task.monitor.image_file("samples", task.draw(f"step_{done:07d}"), done)
    if main:
        task.evaluate(done, final=done == task.total_steps())
    stopping = stop.signal is not None
    if done % t.save_every == 0 or last or stopping:
        save_state(s, done)
    if s.power_ema is not None and main and done % (t.ema_snapshot_every or t.save_every) == 0:
        for sigma, copy_ in zip(s.power_ema.sigma_rels, s.power_ema.copies):
            save_snapshot(s.ctx.run_dir, done, sigma, copy_.state_dict())
    if stopping or (last and not s.complete):
        s.bar.close()
        if main:
            task.monitor.close()
            why = f"received {stop.signal}" if stopping else f"stopped after {done} steps"
            print(f"{why}: saved checkpoint at step {done}; continue with `{task.resume_command} {s.ctx.run_dir}`")
        return True
    return False


def write_log_row(s: LoopState, log, done: int, lr: float, grad_norm) -> None:
    """A row of RUN/log.csv (and TensorBoard): the means over all processes since the last row."""
    task, acc = s.task, s.ctx.accelerator
    n = len(task.log_values)
    means = acc.reduce(torch.stack(s.window).mean(0), "mean").tolist() if s.window else [float("nan")] * n
    skipped = s.guard.take_since_log()
    now = time.time()
    rate = (len(s.window) + skipped) / max(now - s.t_last, 1e-9)
    s.window, s.t_last = [], now
    status = {k: task.status()[k] for k in task.log_status}
    s.bar.set_postfix(**{k: f"{v:.4f}" for k, v in zip(task.log_values[:2], means)}, **status, lr=f"{lr:.2e}",
                      refresh=False)
    if s.ctx.main:
        norm = float(grad_norm)
        log.row([done, *(f"{v:.6f}" for v in means), *status.values(), f"{lr:.6g}", f"{norm:.4f}", f"{rate:.3f}",
                 f"{now - s.t0:.1f}", skipped])
        values = {f"train/{k}": v for k, v in zip(task.log_values, means)}
        values.update({f"train/{k}": v for k, v in status.items()})
        task.monitor.scalars(done, {**values, "train/lr": lr, "train/grad_norm": norm, "train/it_per_s": rate})


def save_state(s: LoopState, done: int) -> None:
    """The checkpoint of training step ``done``: trainee, EMA(s), optimiser, the task's state and networks,
    the loss scaler."""
    task, acc, trainee = s.task, s.ctx.accelerator, s.task.trainee
    acc.wait_for_everyone()
    if s.ctx.main:
        weights = {**task.weights(), **(s.power_ema.state_dicts() if s.power_ema is not None else {})}
        save_checkpoint(s.ctx.run_dir, done, trainee.raw.state_dict(), trainee.ema.state_dict(),
                        trainee.opt.state_dict(), extra={**task.state(), **scaler_state(acc)},
                        keep=task.cfg.train.keep_checkpoints, weights=weights or None)
    acc.wait_for_everyone()


def finish(s: LoopState) -> None:
    """After the last training step: the task's final pictures and measurements (main process)."""
    s.bar.close()
    if s.ctx.main:
        s.task.finish(time.time() - s.t0, s.guard.total)
        s.task.monitor.close()
    s.ctx.accelerator.wait_for_everyone()
