"""Setting up a training run: accelerator, data, run folder, model / EMA / optimizer, resume, batches.

Everything random in a step is derived from ``(seed, step)`` (data order: :class:`StepBatchSampler`)
and the rank, so the state built here is all a resumed run needs to continue bit for bit."""

from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from accelerate import Accelerator

from ddpmlab.config import Config, save_config, validate
from ddpmlab.data import InMemoryDataset, build_dataset
from ddpmlab.data.latents import LATENTS_FILE, cached_latents, describe_autoencoder, encode_batches, latent_cache_key
from ddpmlab.diffusion.objectives import DiffusionObjective
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.reference import dataset_fingerprint, default_cache_dir
from ddpmlab.io.checkpoint import (
    CONFIG_FILE,
    find_checkpoint,
    load_run_config,
    restore_training_state,
    save_run_config,
)
from ddpmlab.models import build_model, count_parameters
from ddpmlab.models.conditioned import check_low_res
from ddpmlab.progress import progress_bar
from ddpmlab.runs import load_autoencoder, resolve_device
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.distributed import (
    agree_on,
    check_batch_split,
    check_mixed_precision,
    forget_accelerator_precision,
    load_scaler_state,
    process_state,
    use_cpu,
)
from ddpmlab.training.guard import BadStepGuard
from ddpmlab.training.lock import LOCK_FILE
from ddpmlab.training.monitor import TrainingMonitor
from ddpmlab.training.posthoc_ema import PowerEMA
from ddpmlab.training.precision import describe_precision, resolve_precision

# keys a resumed run may change; everything else must match the stored config
RESUME_MUTABLE = {
    "train.steps", "train.log_every", "train.sample_every", "train.save_every", "train.sample_n",
    "train.sample_steps", "train.sample_sampler", "train.device", "data.num_workers",
    "train.keep_checkpoints", "train.max_bad_steps", "train.grad_accum_steps",
    "train.eval_every", "train.eval_n", "train.eval_metrics", "train.eval_sampler", "train.eval_steps",
    "train.eval_inception_weights", "train.tensorboard", "train.keep_freed_memory", "train.ema_snapshot_every",
    "train.minutes", "model.gradient_checkpointing",
}


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


def new_run_dir(cfg: Config, tag: str = "") -> Path:
    # several processes must agree on the folder: rank 0's clock names it
    name = cfg.train.name or agree_on(f"{cfg.data.dataset}{tag}-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
                                     cfg.train.device)
    run_dir = Path(cfg.train.out_dir) / name
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):  # rank 0 may hold the lock
        raise DDPMError(
            f"run directory '{run_dir}' already exists and is not empty; continue it with "
            f"`ddpm train --resume {run_dir}` or pick another train.name"
        )
    return run_dir


def resume_config(run_dir, overrides_cfg: Optional[Config], changed_keys: list, force: bool = False,
                  force_option: str = "force=True") -> Config:
    """The stored config of ``run_dir`` with the allowed overrides applied.

    Keys outside RESUME_MUTABLE are refused unless ``force`` (then each change is announced);
    ``force_option`` is how the caller sets it, for the messages.
    """
    stored = load_run_config(run_dir)
    bad = [k for k in changed_keys if k not in RESUME_MUTABLE]
    if bad and not force:
        raise ConfigError(
            f"cannot change {', '.join(bad)} when resuming {run_dir} (the run was trained with "
            f"its stored {CONFIG_FILE}); only {', '.join(sorted(RESUME_MUTABLE))} may change "
            f"(add {force_option} to change it anyway)"
        )
    if overrides_cfg is not None:
        for key in changed_keys:
            section, name = key.split(".")
            old, new = getattr(getattr(stored, section), name), getattr(getattr(overrides_cfg, section), name)
            if key in bad and old != new:
                print(f"warning: {force_option}: {key} changes from {old!r} to {new!r} in the middle of {run_dir}")
            setattr(getattr(stored, section), name, new)
    validate(stored, source=f"{run_dir}/{CONFIG_FILE} + command line")
    return stored


@dataclass
class TrainState:
    """What the training loop carries: the set-up's objects and the log window since the last row."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    main: bool  # the process that owns the run directory (logs, samples, checkpoints)
    dataset: torch.utils.data.Dataset
    schedule: NoiseSchedule
    model: torch.nn.Module  # as prepared by Accelerate (wrapped for several processes)
    raw_model: torch.nn.Module  # the same weights, unwrapped: the EMA's source, the checkpoint's
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    objective: DiffusionObjective
    start: int
    power_ema: Optional[PowerEMA] = None  # train.ema_profiles (None: none)
    loader: Optional[torch.utils.data.DataLoader] = None
    bar: Any = None
    guard: Optional[BadStepGuard] = None
    monitor: Optional[TrainingMonitor] = None
    images: Optional[torch.utils.data.Dataset] = None  # the data in pixels (a latent run's dataset is its latents)
    losses: list = field(default_factory=list)  # losses of the good steps since the last log row
    t0: float = 0.0
    t_last: float = 0.0
    max_steps: int = 0  # train.steps as configured (train.minutes fits the run's steps under it)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def set_up(cfg: Config, run_dir: Path, resume: bool, progress: bool) -> TrainState:
    """Accelerator, data, run folder, model / EMA / optimizer (restored on resume), objective and batches."""
    if cfg.stage != "diffusion":
        raise ConfigError(f"{run_dir} is an autoencoder run (stage {cfg.stage}); continue it with "
                          f"`ddpm train-autoencoder --resume {run_dir}`")
    if cfg.model.autoencoder:
        describe_autoencoder(cfg.model.autoencoder)  # a bad path fails before the data is read
    accelerator, precision = _make_accelerator(cfg)
    if accelerator.device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    main = process_state(cfg.train.device).is_main_process
    dataset = load_data(cfg)  # the data first: a missing or unusable dataset must not leave a run folder
    if main:
        print(describe_data(cfg, dataset))
    latents, images = None, dataset
    if cfg.model.autoencoder:  # latent diffusion: the denoiser trains on the encoded data
        dataset, latents = latent_dataset(cfg, dataset, accelerator, main, progress)
    if not resume:
        _create_run_dir(cfg, run_dir, accelerator, main)
    if latents is not None and main:
        (run_dir / LATENTS_FILE).write_text(json.dumps(latents, indent=2) + "\n")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    model, ema, opt = build_model_ema_optimizer(cfg, accelerator.device)
    power_ema = PowerEMA(model, cfg.train.ema_profiles) if cfg.train.ema_profiles else None
    start, objective_state = (_restore(cfg, run_dir, accelerator, main, model, ema, opt, power_ema) if resume
                              else (0, None))
    model, opt = accelerator.prepare(model, opt)
    ema.to(accelerator.device)
    if power_ema is not None:
        power_ema.to(accelerator.device)
    # the loss of diffusion.loss_type; its state (importance-sampling history) is checkpointed
    objective = DiffusionObjective.from_config(cfg, schedule, gather=accelerator.gather)
    objective.load_state_dict(objective_state)
    s = TrainState(cfg, run_dir, accelerator, main, dataset, schedule, model, accelerator.unwrap_model(model),
                   ema, opt, objective, start, power_ema, images=images)
    if main:
        _trim_log(run_dir / "log.csv", start)
    s.loader = _make_loader(s)
    if main and start == 0:
        print(f"run {run_dir}: {count_parameters(s.raw_model) / 1e6:.2f}M parameters, {len(dataset)} examples, "
              f"{cfg.train.steps} steps on {s.device} x{accelerator.num_processes}, {precision}")
    _start_reporting(s, progress)
    return s


def _make_accelerator(cfg: Config) -> Tuple[Accelerator, str]:
    """The Accelerator of train.device and train.mixed_precision (auto resolved); and what precision, why."""
    dev = cfg.train.device
    device = resolve_device(dev, "train.device")  # an unknown or absent device: the message every command gives
    if ":" in dev:
        raise ConfigError(f"train.device '{dev}': pick the GPU with CUDA_VISIBLE_DEVICES=N and train.device=cuda")
    precision, why = resolve_precision(cfg.train.mixed_precision, device.type)
    check_mixed_precision(precision, dev)
    forget_accelerator_precision()  # a second train() in one process may use another precision
    accelerator = Accelerator(cpu=use_cpu(dev), mixed_precision=precision)
    return accelerator, f"{describe_precision(precision)} ({why})"


def load_data(cfg: Config) -> torch.utils.data.Dataset:
    """The training data of ``cfg.data``, checked against model.num_classes and data.low_res."""
    dataset = build_dataset(cfg)
    if dataset.is_image:
        check_low_res(cfg, dataset.sample_shape)  # super-resolution: the low-res size fits the images
    n = cfg.model.num_classes
    if n and not dataset.num_classes:
        raise ConfigError(f"model.num_classes is {n} but the data ({cfg.data.dataset}"
                          f"{' ' + str(cfg.data.path) if cfg.data.path else ''}) has no labels; put the images "
                          "in one sub-folder per class or set model.num_classes=null")
    if n and n < dataset.num_classes:
        raise ConfigError(f"model.num_classes ({n}) is smaller than the dataset's {dataset.num_classes} classes")
    return dataset


def latent_dataset(cfg: Config, dataset, accelerator: Accelerator, main: bool, progress: bool) -> tuple:
    """(the latents of ``dataset`` as an InMemoryDataset, what RUN/latents.json records).

    Rombach et al. 2022: z' = (mu(x) - shift) * scale of every image, encoded once and cached in
    <cache dir>/latents/<key>.safetensors, key = hash(data content, autoencoder weights and scaling).
    """
    codec = load_autoencoder(cfg.model.autoencoder, accelerator.device)
    key = latent_cache_key(dataset_fingerprint(dataset), codec.identity)
    cache_file = default_cache_dir() / "latents" / f"{key}.safetensors"

    def encode_all():
        bar = progress_bar(progress and main, total=len(dataset), desc="encoding latents", unit="img")
        try:
            return encode_batches(codec.encode, dataset, bar=bar)
        finally:
            bar.close()

    with accelerator.main_process_first():  # the main process encodes and writes; the others read its file
        z, y, hit = cached_latents(cache_file, encode_all)
    if main:
        print(f"latents: {tuple(z.shape[1:])} per image (std {z.std().item():.3f}) from {codec.source}, "
              f"{'read from' if hit else 'encoded once into'} {cache_file}")
    out = InMemoryDataset(z, y, is_image=True, class_names=getattr(dataset, "class_names", []),
                          num_classes=dataset.num_classes)
    record = {"autoencoder": str(Path(codec.source).resolve()), "identity": codec.identity,
              "scale_factor": codec.scale, "shift_factor": codec.shift, "latent_shape": list(z.shape[1:]),
              "cache_file": str(cache_file)}
    return out, record


def describe_data(cfg: Config, dataset) -> str:
    """The run's first line: what it trains on, and at which size (width x height)."""
    d = cfg.data
    if d.dataset == "toy":
        noise = f", noise {d.toy_noise}" if d.toy_noise else ""
        return f"data: {len(dataset):,} points of the 2-D toy distribution {d.toy}{noise}"
    c, h, w = dataset.sample_shape
    channels = f"{c} channel{'s' if c != 1 else ''}"
    classes = f", {dataset.num_classes} classes" if d.dataset == "folder" and dataset.num_classes else ""
    if d.dataset != "folder":
        return f"data: the bundled {d.dataset} ({len(dataset):,} images of {w}x{h}, {channels}; split {d.split})"
    line = f"data: {len(dataset):,} images from {dataset.root}{classes}, resized and center-cropped to {w}x{h}, " \
           f"{channels}"
    big = dataset.largest_original
    if big is not None and (big[0] > w or big[1] > h):
        line += f" (originals up to {big[0]}x{big[1]}: set data.image_size to train at a higher resolution)"
    return line


def _create_run_dir(cfg: Config, run_dir: Path, accelerator: Accelerator, main: bool) -> None:
    """A new run's folder with its config.yaml (train() resolved it: new, or empty but for the lock)."""
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise DDPMError(f"run directory '{run_dir}' is not empty; resume it with --resume or choose another")
    accelerator.wait_for_everyone()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)


def build_model_ema_optimizer(cfg: Config, device: torch.device) -> tuple:
    """The denoiser (seeded by train.seed), its EMA copy and AdamW."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)  # learned variance (diffusion.variance): twice the output channels
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused: one pass over each tensor instead of ~10 (5-10 % of a CPU step); resumes keep the stored choice
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                            weight_decay=cfg.train.weight_decay, fused=device.type in ("cpu", "cuda"))
    return model, ema, opt


def _restore(cfg: Config, run_dir: Path, accelerator: Accelerator, main: bool, model, ema, opt,
             power_ema: Optional[PowerEMA] = None) -> tuple:
    """Load the newest loadable checkpoint of a resumed run; (its step, the objective's state)."""
    start, objective_state = 0, None
    ckpt_path, ckpt, skipped = find_checkpoint(run_dir)  # newest loadable, damaged ones listed
    if ckpt is not None:
        restore_training_state(ckpt_path, ckpt, model, ema, opt)
        if power_ema is not None:
            power_ema.load_state_dicts(ckpt["weights"])
        start = ckpt["step"]
        objective_state = ckpt["state"].get("objective")
        load_scaler_state(accelerator, ckpt["state"])  # fp16: the loss scale continues
    if main:
        _report_resume(run_dir, ckpt_path, start, skipped)
        save_run_config(cfg, run_dir)  # the resolved config, with any changes of this resume
    return start, objective_state


def _make_loader(s: TrainState) -> torch.utils.data.DataLoader:
    """This process's batches of steps start..train.steps-1 (see StepBatchSampler)."""
    t, acc = s.cfg.train, s.accelerator
    check_batch_split(t.batch_size, acc.num_processes, t.grad_accum_steps)
    sampler = StepBatchSampler(len(s.dataset), t.batch_size, s.start, t.steps, t.seed, acc.process_index,
                               acc.num_processes)
    return torch.utils.data.DataLoader(s.dataset, batch_sampler=sampler, num_workers=s.cfg.data.num_workers,
                                       pin_memory=s.device.type == "cuda")


def _start_reporting(s: TrainState, progress: bool) -> None:
    """The progress bar, the non-finite step guard and (main process) TensorBoard and evaluation."""
    s.bar = progress_bar(progress and s.main, total=s.cfg.train.steps, initial=s.start, desc="training")
    say = _say(s.bar) if s.main else (lambda m: None)
    s.guard = BadStepGuard(s.cfg.train.max_bad_steps, say=say, run_dir=s.run_dir)
    # TensorBoard and evaluation every train.eval_every steps (main process only); evaluation draws
    # pixels (a latent run's samples decoded) and scores them against the images
    images = s.dataset if s.images is None else s.images
    s.monitor = TrainingMonitor(s.cfg, s.run_dir, images, s.start, s.device, say=say) if s.main else None
    s.t0 = s.t_last = time.time()


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
