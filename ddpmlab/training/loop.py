"""The training loop (Ho et al. 2020, Algorithm 1) on HF Accelerate.

One process or many (``accelerate launch`` / ``torchrun``): each process draws its
slice of the global batch (in ``train.grad_accum_steps`` micro-batches, see
:mod:`ddpmlab.distributed`).  Everything random in a step is derived from ``(seed, step)``
(data order, t, noise: the same for any number of processes) and the rank (dropout,
label dropout), so a run resumed from a checkpoint continues bit for bit as if it had
never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from ddpmlab.config import Config, save_config, validate
from ddpmlab.data import build_dataset
from ddpmlab.diffusion.objectives import DiffusionObjective
from ddpmlab.diffusion.reverse import ddpm_sampler_variance
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.checkpoint import (
    CONFIG_FILE,
    find_checkpoint,
    load_run_config,
    require_run_dir,
    restore_training_state,
    save_checkpoint,
    save_run_config,
)
from ddpmlab.models import build_model, count_parameters
from ddpmlab.progress import progress_bar
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import drop_labels
from ddpmlab.samplers.registry import get_sampler
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.distributed import (
    agree_on,
    check_batch_split,
    check_mixed_precision,
    draw_t_and_noise,
    is_main_rank,
    load_scaler_state,
    micro_batches,
    reset_accelerator_state,
    scaler_state,
    use_cpu,
)
from ddpmlab.training.guard import BadStepGuard, optimizer_step
from ddpmlab.training.lock import LOCK_FILE, RunLock
from ddpmlab.training.monitor import TrainingMonitor
from ddpmlab.viz import save_grid, save_scatter

# keys a resumed run may change; everything else must match the stored config
RESUME_MUTABLE = {
    "train.steps", "train.log_every", "train.sample_every", "train.save_every", "train.sample_n",
    "train.sample_steps", "train.sample_sampler", "train.device", "data.num_workers",
    "train.keep_checkpoints", "train.max_bad_steps", "train.grad_accum_steps",
    "train.eval_every", "train.eval_n", "train.eval_metrics", "train.eval_sampler", "train.eval_steps",
    "train.eval_inception_weights", "train.tensorboard", "train.keep_freed_memory",
}
LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "it_per_s", "time_s", "skipped"]


class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches for steps ``start..steps-1``: epoch e is a permutation seeded by (seed, e).

    Each process takes its ``rank``-th slice of the global batch, so data order depends
    only on the step, never on how often the run was stopped and resumed.
    """

    def __init__(self, n: int, global_batch: int, start: int, steps: int, seed: int, rank: int = 0,
                 world: int = 1):
        if global_batch % world:
            raise ConfigError(f"train.batch_size ({global_batch}) must be divisible by the number of processes ({world})")
        self.n, self.gb, self.start, self.steps = n, global_batch, start, steps
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        per = self.gb // self.world
        per_epoch = max(self.n // self.gb, 1)
        epoch_perm = (None, None)  # one permutation per epoch, not per step (randperm(1M) takes ~0.1 s)
        for step in range(self.start, self.steps):
            epoch, k = divmod(step, per_epoch)
            if epoch_perm[0] != epoch:
                epoch_perm = (epoch, self._perm(epoch))
            perm = epoch_perm[1]
            if self.n < self.gb:  # tiny datasets: draw with repetition
                perm = perm.repeat((self.gb + self.n - 1) // self.n)
            batch = perm[k * self.gb:(k + 1) * self.gb]
            yield batch[self.rank * per:(self.rank + 1) * per].tolist()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # exponential moving average of the weights: ema <- decay * ema + (1 - decay) * theta
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def learning_rate(cfg: Config, step: int) -> float:
    # linear warm-up over train.warmup_steps, then constant (Ho et al. 2020, App. B)
    w = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.train.lr


def new_run_dir(cfg: Config) -> Path:
    # several processes must agree on the folder: rank 0's clock names it
    name = cfg.train.name or agree_on(f"{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}", cfg)
    run_dir = Path(cfg.train.out_dir) / name
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):  # rank 0 may hold the lock
        raise DDPMError(
            f"run directory '{run_dir}' already exists and is not empty; continue it with "
            f"`ddpm train --resume {run_dir}` or pick another train.name"
        )
    return run_dir


def resume_config(run_dir, overrides_cfg: Optional[Config], changed_keys: list, force: bool = False) -> Config:
    """The stored config of ``run_dir`` with the allowed overrides applied.

    Keys outside RESUME_MUTABLE are refused unless ``force`` (then each change is announced).
    """
    stored = load_run_config(run_dir)
    bad = [k for k in changed_keys if k not in RESUME_MUTABLE]
    if bad and not force:
        raise ConfigError(
            f"cannot change {', '.join(bad)} when resuming {run_dir} (the run was trained with "
            f"its stored {CONFIG_FILE}); only {', '.join(sorted(RESUME_MUTABLE))} may change "
            "(add --force to change it anyway)"
        )
    if overrides_cfg is not None:
        for key in changed_keys:
            section, name = key.split(".")
            old, new = getattr(getattr(stored, section), name), getattr(getattr(overrides_cfg, section), name)
            if key in bad and old != new:
                print(f"warning: --force: {key} changes from {old!r} to {new!r} in the middle of {run_dir}")
            setattr(getattr(stored, section), name, new)
    validate(stored, source=f"{run_dir}/{CONFIG_FILE} + command line")
    return stored


def _make_accelerator(cfg: Config):
    from accelerate import Accelerator

    dev = cfg.train.device
    if dev not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"train.device '{dev}' not understood; use auto, cpu, cuda or mps "
                          "(pick a GPU with CUDA_VISIBLE_DEVICES)")
    if dev == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    check_mixed_precision(cfg.train.mixed_precision, dev)
    reset_accelerator_state()  # a second train() in one process may use another precision
    return Accelerator(cpu=use_cpu(dev), mixed_precision=cfg.train.mixed_precision)


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


def _sampler_options(cfg) -> dict:
    """DDPM samples use the run's own variance (learned_range: the variance head)."""
    if cfg.train.sample_sampler != "ddpm":
        return {}
    return {"variance": ddpm_sampler_variance(cfg.diffusion.variance)}


def _write_samples(cfg, ema, schedule, dataset, run_dir: Path, tag: str, device) -> Path:
    n = cfg.train.sample_n
    labels = None
    if cfg.model.num_classes:
        labels = torch.arange(n) % cfg.model.num_classes
    x = generate(ema, schedule, dataset.sample_shape, n, sampler=cfg.train.sample_sampler,
                 steps=cfg.train.sample_steps, prediction=cfg.diffusion.prediction,
                 clip_x0=1.0 if dataset.is_image else None, seed=cfg.train.seed, device=device,
                 labels=labels, progress=False, **_sampler_options(cfg))
    out = run_dir / "samples" / f"{tag}.png"
    if dataset.is_image:
        scale = max(1, 128 // max(dataset.sample_shape[1:]))
        return save_grid(x, out, scale=min(scale, 4))
    ref = torch.stack([dataset[i][0] for i in range(min(len(dataset), 2000))])
    return save_scatter(x, out, reference=ref, title=f"samples at {tag}")


def train(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False, progress: bool = True,
          fault_hook=None) -> Path:
    """Train a denoiser as configured; return the run directory.

    ``resume=True`` continues ``run_dir`` from its newest loadable checkpoint.
    ``fault_hook(step, loss)`` (tests) may replace the loss of a step.
    The run directory is locked (RUN/.lock) while training: a second process refuses.
    """
    get_sampler(cfg.train.sample_sampler)  # a bad name fails now, not after the last step
    run_dir = require_run_dir(run_dir) if resume else Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    with RunLock(run_dir, enabled=is_main_rank()):
        return _train(cfg, run_dir, resume, progress, fault_hook)


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, fault_hook) -> Path:
    accelerator = _make_accelerator(cfg)
    device = accelerator.device
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    main = accelerator.is_main_process
    # the data first: a missing or unusable dataset must not leave a config in a new run folder
    dataset = build_dataset(cfg)
    if cfg.model.num_classes and not dataset.num_classes:
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the data ({cfg.data.dataset}"
                          f"{' ' + str(cfg.data.path) if cfg.data.path else ''}) has no labels; put the images "
                          "in one sub-folder per class or set model.num_classes=null")
    if cfg.model.num_classes and dataset.num_classes and cfg.model.num_classes < dataset.num_classes:
        raise ConfigError(f"model.num_classes ({cfg.model.num_classes}) is smaller than the dataset's "
                          f"{dataset.num_classes} classes")
    if not resume:  # train() resolved run_dir (resume: an existing run; else new and empty but for the lock)
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise DDPMError(f"run directory '{run_dir}' is not empty; resume it with --resume or choose another")
        accelerator.wait_for_everyone()
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / CONFIG_FILE)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)  # learned variance (diffusion.variance): twice the output channels
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused: one pass over each tensor instead of ~10 (5-10 % of a CPU step); resumes keep the stored choice
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                            weight_decay=cfg.train.weight_decay, fused=device.type in ("cpu", "cuda"))

    start, objective_state = 0, None
    if resume:
        ckpt_path, ckpt, skipped = find_checkpoint(run_dir)  # newest loadable, damaged ones listed
        if ckpt is not None:
            restore_training_state(ckpt_path, ckpt, model, ema, opt)
            start = ckpt["step"]
            objective_state = ckpt["state"].get("objective")
            load_scaler_state(accelerator, ckpt["state"])  # fp16: the loss scale continues
        if main:
            _report_resume(run_dir, ckpt_path, start, skipped)
            save_run_config(cfg, run_dir)  # the resolved config, with any changes of this resume
    model, opt = accelerator.prepare(model, opt)
    ema.to(device)
    # the loss of diffusion.loss_type; its state (importance-sampling history) is checkpointed
    objective = DiffusionObjective.from_config(cfg, schedule, gather=accelerator.gather)
    objective.load_state_dict(objective_state)
    raw_model = accelerator.unwrap_model(model)

    log_path = run_dir / "log.csv"
    if main:
        _trim_log(log_path, start)

    check_batch_split(cfg.train.batch_size, accelerator.num_processes, cfg.train.grad_accum_steps)
    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size, start, cfg.train.steps, cfg.train.seed,
                               accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda")
    if main and start == 0:
        print(f"run {run_dir}: {count_parameters(raw_model) / 1e6:.2f}M parameters, {len(dataset)} examples, "
              f"{cfg.train.steps} steps on {device} x{accelerator.num_processes}")

    bar = progress_bar(progress and main, total=cfg.train.steps, initial=start, desc="training")
    losses, t0, t_last, step = [], time.time(), time.time(), start
    grad_norm = torch.tensor(0.0)
    guard = BadStepGuard(cfg.train.max_bad_steps, say=_say(bar) if main else (lambda m: None), run_dir=run_dir)
    # TensorBoard and evaluation every train.eval_every steps (main process only)
    monitor = TrainingMonitor(cfg, run_dir, dataset, start, device, say=_say(bar)) if main else None
    with _StopFlag() as stop, open(log_path, "a", newline="") if main else _Null() as logf:
        writer = csv.writer(logf) if main else None
        if main and start == 0:
            writer.writerow(LOG_FIELDS)
        model.train()
        for step, (x0, y) in enumerate(loader, start=start):
            # everything random in this step follows from (seed, step, rank): exact resume
            seed = (cfg.train.seed * 1_000_003 + step) * 4099 + accelerator.process_index
            torch.manual_seed(seed)
            gen = torch.Generator(device=device).manual_seed(seed)
            x0 = x0.to(device, non_blocking=True)
            y = y.to(device) if cfg.model.num_classes else None
            # t and noise are drawn for the global batch from (seed, step) alone; this process keeps its rows
            shared = torch.Generator(device=device).manual_seed(seed - accelerator.process_index)
            t, noise = draw_t_and_noise(objective.sample_timesteps, x0, cfg.train.batch_size,
                                        accelerator.process_index, shared)
            if y is not None:  # classifier-free guidance: some labels become "no label"
                y = drop_labels(y, cfg.train.label_dropout, cfg.model.num_classes, generator=gen)
            lr = learning_rate(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, k = torch.zeros((), device=device), cfg.train.grad_accum_steps
            for j, (xj, tj, nj, yj) in enumerate(micro_batches(k, x0, t, noise, y)):
                # gradient accumulation: the mean of k micro-batch losses; all-reduce after the last only
                with accelerator.no_sync(model) if j < k - 1 else contextlib.nullcontext():
                    with accelerator.autocast():
                        part = objective(model, xj, t=tj, noise=nj, y=yj) / k
                    if fault_hook is not None:
                        part = fault_hook(step, part)
                    accelerator.backward(part)
                loss = loss + part.detach()
            # clip at train.grad_clip (0: only measure); a NaN/inf loss or gradient never reaches the weights
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
            ok = optimizer_step(accelerator, opt, guard.check(step, loss, grad_norm, accelerator))
            opt.zero_grad(set_to_none=True)
            done = step + 1
            if ok and done % cfg.train.ema_every == 0:
                ema_update(ema, raw_model, 0.0 if done <= cfg.train.ema_start else cfg.train.ema_decay)
            if ok:
                losses.append(loss.detach())
            bar.update(1)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                mean_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item() if losses else float("nan")
                skipped_steps = guard.take_since_log()
                now = time.time()
                rate = (len(losses) + skipped_steps) / max(now - t_last, 1e-9)
                losses, t_last = [], now
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if main:
                    writer.writerow([done, f"{mean_loss:.6f}", f"{lr:.6g}", f"{float(grad_norm):.4f}",
                                     f"{rate:.3f}", f"{now - t0:.1f}", skipped_steps])
                    logf.flush()
                    monitor.scalars(done, {"train/loss": mean_loss, "train/lr": lr,
                                           "train/grad_norm": float(grad_norm), "train/it_per_s": rate})
            if cfg.train.sample_every and done % cfg.train.sample_every == 0 and main and done < cfg.train.steps:
                png = _write_samples(cfg, ema, schedule, dataset, run_dir, f"step_{done:07d}", device)
                monitor.image_file("samples", png, done)
            if main:
                monitor.maybe_evaluate(done, ema, schedule, final=done == cfg.train.steps)
            stopping = stop.signal is not None
            if done % cfg.train.save_every == 0 or done == cfg.train.steps or stopping:
                _save(accelerator, run_dir, done, raw_model, ema, opt,
                      {"objective": objective.state_dict(), **scaler_state(accelerator)},
                      keep=cfg.train.keep_checkpoints)
            if stopping:
                bar.close()
                if main:
                    monitor.close()
                    print(f"received {stop.signal}: saved checkpoint at step {done}; "
                          f"continue with `ddpm train --resume {run_dir}`")
                return run_dir
    bar.close()
    if main:
        path = _write_samples(cfg, ema, schedule, dataset, run_dir, "final", device)
        monitor.image_file("samples", path, cfg.train.steps)
        monitor.close()
        print(f"done: {cfg.train.steps} steps in {time.time() - t0:.0f} s; samples (EMA) -> {path}"
              + (f"; {guard.total} steps skipped (non-finite loss or gradient)" if guard.total else ""))
    accelerator.wait_for_everyone()
    return run_dir


def _save(accelerator, run_dir, step, model, ema, opt, extra=None, keep: int = 3) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), opt.state_dict(), extra=extra,
                        keep=keep)
    accelerator.wait_for_everyone()


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (a crash may leave them)."""
    if not log_path.exists() or step == 0:
        if step == 0 and log_path.exists():
            log_path.unlink()
        return
    rows = list(csv.reader(log_path.open()))
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    tmp = log_path.with_name(f".{log_path.name}.tmp")  # replaced atomically: a crash keeps the old log
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(kept)
    tmp.replace(log_path)


def _report_resume(run_dir: Path, ckpt_path: Optional[Path], start: int, skipped: list) -> None:
    """Say which checkpoint a resume picked and which damaged ones it skipped."""
    for bad, reason in skipped:
        print(f"warning: skipping damaged checkpoint {bad.name} ({reason})")
    if ckpt_path is None:
        print(f"resuming {run_dir}: no loadable checkpoint, starting from step 0")
    else:
        print(f"resuming {run_dir} from {ckpt_path.name} (step {start})"
              + (f", the newest loadable one ({len(skipped)} damaged skipped)" if skipped else ""))


def _say(bar):
    """Print a line without breaking the progress bar."""
    return lambda message: bar.write(message) if hasattr(bar, "write") else print(message)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
