"""``ddpm train-autoencoder``: the first stage of latent diffusion (Rombach et al. 2022, Sec. 3).

The loss of one batch x (Rombach et al. 2022, App. G; Esser et al. 2021, Eq. 4-7)::

    L_AE = rec(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)) / (C H W)  [+ lambda * L_G],  z ~ q(z|x)
    L_G  = -E[D_phi(D(z))],   L_D = 0.5 (E[relu(1 - D_phi(x))] + E[relu(1 + D_phi(D(z)))])

with rec the per-pixel L1 or L2 error and the KL summed over latent dims (so kl_weight is LDM's
1e-6 against the reconstruction summed over pixels); the PatchGAN D_phi (``autoencoder.discriminator``)
joins after ``autoencoder.disc_start`` steps, lambda = disc_weight (times the adaptive weight
||grad rec|| / ||grad L_G|| at the decoder's last layer).  The run folder is a diffusion run's
(config.yaml with ``stage: autoencoder``, safetensors checkpoints, log.csv, TensorBoard, EMA, bit-identical
resume: everything random comes from ``(seed, step)``); at the end it measures the reconstruction PSNR on
held-out images and the latent statistics, whose 1/std is the scale factor diffusion uses (Stable
Diffusion's 0.18215), and writes them to ``RUN/autoencoder.json``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator

from ddpmlab.config import Config, validate
from ddpmlab.data.latents import AE_STATS_FILE
from ddpmlab.errors import ConfigError
from ddpmlab.io.checkpoint import (
    find_checkpoint,
    require_run_dir,
    restore_training_state,
    save_checkpoint,
    save_run_config,
)
from ddpmlab.io.images import save_grid
from ddpmlab.models import count_parameters
from ddpmlab.models.autoencoder import (
    KLAutoencoder,
    PatchDiscriminator,
    adaptive_weight,
    build_autoencoder,
    hinge_d_loss,
)
from ddpmlab.progress import progress_bar
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.distributed import load_scaler_state, process_state, scaler_state
from ddpmlab.training.guard import BadStepGuard, optimizer_step
from ddpmlab.training.lock import RunLock
from ddpmlab.training.loop import _StopFlag, ema_update, learning_rate, step_generators
from ddpmlab.training.monitor import TrainingMonitor
from ddpmlab.training.setup import (
    StepBatchSampler,
    _create_run_dir,
    _make_accelerator,
    _report_resume,
    _say,
    _trim_log,
    describe_data,
    load_data,
    new_run_dir,
)

LOG_FIELDS = ["step", "loss", "rec", "kl", "g_loss", "d_loss", "lr", "grad_norm", "it_per_s", "time_s", "skipped"]
HOLDOUT_SEED = 7919  # the held-out split is seeded apart from the batches (train.seed + this)


@dataclass
class AEState:
    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    main: bool
    train_set: torch.utils.data.Dataset
    held_out: torch.utils.data.Dataset
    model: torch.nn.Module  # prepared by Accelerate
    raw_model: KLAutoencoder
    ema: KLAutoencoder
    disc: Optional[torch.nn.Module]  # prepared; None without autoencoder.discriminator
    raw_disc: Optional[PatchDiscriminator]
    opt: torch.optim.Optimizer
    start: int
    loader: Any = None
    bar: Any = None
    guard: Optional[BadStepGuard] = None
    monitor: Optional[TrainingMonitor] = None
    window: list = field(default_factory=list)  # (loss, rec, kl, g, d) of the good steps since the last row
    t0: float = 0.0
    t_last: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def train_autoencoder(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False,
                      progress: bool = True) -> Path:
    """Train the autoencoder of ``cfg.autoencoder`` on ``cfg.data``; return the run directory."""
    cfg.stage = "autoencoder"
    if cfg.model.autoencoder:  # a latent config's pointer to the first stage, not part of it
        print(f"note: model.autoencoder ({cfg.model.autoencoder}) is for the diffusion stage; this run trains the "
              "autoencoder of autoencoder.* and stores model.autoencoder=null")
        cfg.model.autoencoder = None
    validate(cfg, source="config")
    t = cfg.train
    if t.grad_accum_steps != 1:
        raise ConfigError("train.grad_accum_steps: ddpm train-autoencoder takes whole batches; set it to 1")
    if t.eval_every:
        raise ConfigError("train.eval_every is for diffusion runs; an autoencoder run measures its reconstruction "
                          "PSNR at the end (set train.eval_every=0)")
    if cfg.model.num_classes:
        raise ConfigError("model.num_classes: the autoencoder takes no labels; set model.num_classes=null")
    run_dir = require_run_dir(run_dir) if resume else Path(run_dir) if run_dir is not None else \
        new_run_dir(cfg, tag="-autoencoder")
    with RunLock(run_dir, enabled=process_state(t.device).is_main_process):
        s = set_up(cfg, run_dir, resume, progress)
        return run_loop(s)


def split_holdout(dataset, fraction: float, seed: int) -> tuple:
    """(training subset, held-out subset): a seeded ``fraction`` of the examples (at least 1 when > 0) held out."""
    n = len(dataset)
    n_hold = min(max(int(round(fraction * n)), 1 if fraction > 0 else 0), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + HOLDOUT_SEED))
    held, kept = perm[:n_hold].sort().values, perm[n_hold:].sort().values
    return torch.utils.data.Subset(dataset, kept.tolist()), torch.utils.data.Subset(dataset, held.tolist())


def build_networks(cfg: Config, in_channels: int, device: torch.device) -> tuple:
    """(autoencoder, its EMA, discriminator or None, AdamW over both), seeded by train.seed."""
    a, t = cfg.autoencoder, cfg.train
    torch.manual_seed(t.seed)
    model = build_autoencoder(in_channels, a.block_out_channels, a.latent_channels, a.layers_per_block, a.norm_groups)
    ema = copy.deepcopy(model).requires_grad_(False)
    disc = PatchDiscriminator(in_channels, a.disc_channels, a.disc_layers) if a.discriminator else None
    groups = [{"params": list(model.parameters())}]
    if disc is not None:  # one AdamW, two groups: Adam's update is per parameter, as with two optimizers
        groups.append({"params": list(disc.parameters())})
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    return model, ema, disc, opt


def set_up(cfg: Config, run_dir: Path, resume: bool, progress: bool) -> AEState:
    """Accelerator, data (with the held-out split), run folder, networks (restored on resume), batches."""
    accelerator, precision = _make_accelerator(cfg)
    if accelerator.device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()
    main = process_state(cfg.train.device).is_main_process
    dataset = load_data(cfg)
    if not dataset.is_image:
        raise ConfigError(f"data.dataset={cfg.data.dataset}: an autoencoder needs images")
    if main:
        print(describe_data(cfg, dataset))
    if not resume:
        _create_run_dir(cfg, run_dir, accelerator, main)
    train_set, held_out = split_holdout(dataset, cfg.autoencoder.holdout, cfg.train.seed)
    model, ema, disc, opt = build_networks(cfg, dataset.sample_shape[0], accelerator.device)
    start = 0
    ckpt_path, ckpt, skipped = find_checkpoint(run_dir) if resume else (None, None, [])
    if ckpt is not None:
        restore_training_state(ckpt_path, ckpt, model, ema, opt)
        if disc is not None:
            disc.load_state_dict(ckpt["weights"]["discriminator"])
        start = ckpt["step"]
        load_scaler_state(accelerator, ckpt["state"])
    if resume and main:
        _report_resume(run_dir, ckpt_path, start, skipped)
        save_run_config(cfg, run_dir)  # the resolved config, with any changes of this resume
    if disc is None:
        model, opt = accelerator.prepare(model, opt)
    else:
        model, disc, opt = accelerator.prepare(model, disc, opt)
    ema.to(accelerator.device)
    s = AEState(cfg, run_dir, accelerator, main, train_set, held_out, model, accelerator.unwrap_model(model), ema,
                disc, accelerator.unwrap_model(disc) if disc is not None else None, opt, start)
    if main:
        _trim_log(run_dir / "log.csv", start)
    t = cfg.train
    sampler = StepBatchSampler(len(train_set), t.batch_size, start, t.steps, t.seed, accelerator.process_index,
                               accelerator.num_processes)
    s.loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                           pin_memory=s.device.type == "cuda")
    if main and start == 0:
        c, h, w = dataset.sample_shape
        f = s.raw_model.downsampling
        print(f"run {run_dir}: autoencoder {count_parameters(s.raw_model) / 1e6:.2f}M parameters "
              f"(latent {cfg.autoencoder.latent_channels}x{h // f}x{w // f})"
              + (f", discriminator {count_parameters(s.raw_disc) / 1e6:.2f}M from step {cfg.autoencoder.disc_start}"
                 if disc is not None else "")
              + f", {len(train_set)} training / {len(held_out)} held-out images, {t.steps} steps on {s.device} "
                f"x{accelerator.num_processes}, {precision}")
    s.bar = progress_bar(progress and main, total=t.steps, initial=start, desc="autoencoder")
    say = _say(s.bar) if main else (lambda m: None)
    s.guard = BadStepGuard(t.max_bad_steps, say=say, run_dir=run_dir)
    s.monitor = TrainingMonitor(cfg, run_dir, dataset, start, s.device, say=say) if main else None
    s.t0 = s.t_last = time.time()
    return s


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-pixel |x - x_hat| (l1) or (x - x_hat)^2 (l2)."""
    diff = x_rec.float() - x.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def train_step(s: AEState, step: int, x: torch.Tensor) -> tuple:
    """One optimizer step of the autoencoder (and the discriminator after disc_start); (ok, values, lr, norm)."""
    cfg, a, acc = s.cfg, s.cfg.autoencoder, s.accelerator
    own, _ = step_generators(cfg.train.seed, step, acc.process_index, s.device)
    x = x.to(s.device, non_blocking=True)
    lr = learning_rate(cfg, step)
    for g in s.opt.param_groups:
        g["lr"] = lr
    adversarial = s.disc is not None and step >= a.disc_start
    zero = torch.zeros((), device=s.device)
    with acc.autocast():
        x_rec, kl = s.model(x, generator=own)  # z ~ q(z|x) by the reparameterisation
        rec = reconstruction_loss(x_rec, x, a.loss)
        kl_term = kl.float().mean() / x[0].numel()  # KL summed over latent dims, per pixel as rec is
        loss = rec + a.kl_weight * kl_term
        g_loss = zero
        if adversarial:
            g_loss = -s.disc(x_rec).float().mean()
            weight = a.disc_weight
            if a.disc_adaptive:
                weight = weight * adaptive_weight(rec, g_loss, s.raw_model.vae.decoder.conv_out.weight)
            loss = loss + weight * g_loss
    acc.backward(loss)
    d_loss = zero
    if adversarial:
        for p in s.disc.parameters():  # the generator's loss must not train the discriminator
            p.grad = None
        with acc.autocast():
            d_loss = hinge_d_loss(s.disc(x.detach()).float(), s.disc(x_rec.detach()).float())
        acc.backward(d_loss)
    clip = cfg.train.grad_clip or float("inf")
    grad_norm = acc.clip_grad_norm_(s.model.parameters(), clip)
    if adversarial:
        acc.clip_grad_norm_(s.disc.parameters(), clip)
    total = (loss + d_loss).detach()
    ok = optimizer_step(acc, s.opt, s.guard.check(step, total, grad_norm, acc))
    s.opt.zero_grad(set_to_none=True)
    done = step + 1
    if ok and done % cfg.train.ema_every == 0:
        ema_update(s.ema, s.raw_model, 0.0 if done <= cfg.train.ema_start else cfg.train.ema_decay)
    values = torch.stack([loss.detach().float(), rec.detach(), kl_term.detach(), g_loss.detach(), d_loss.detach()])
    return ok, values, lr, grad_norm


def run_loop(s: AEState) -> Path:
    """One train_step per batch, a log row every train.log_every steps, checkpoints, then the measurements."""
    t = s.cfg.train
    log_path = s.run_dir / "log.csv"
    with _StopFlag() as stop, open(log_path, "a", newline="") if s.main else contextlib.nullcontext() as log:
        if s.main and s.start == 0:
            csv.writer(log).writerow(LOG_FIELDS)
        s.model.train()
        if s.disc is not None:
            s.disc.train()
        for step, (x, _) in enumerate(s.loader, start=s.start):
            ok, values, lr, grad_norm = train_step(s, step, x)
            done = step + 1
            if ok:
                s.window.append(values)
            s.bar.update(1)
            if done % t.log_every == 0 or done == t.steps:
                _log_row(s, log, done, lr, grad_norm)
            stopping = stop.signal is not None
            if done % t.save_every == 0 or done == t.steps or stopping:
                save_state(s, done)
            if stopping:
                s.bar.close()
                if s.main:
                    s.monitor.close()
                    print(f"received {stop.signal}: saved checkpoint at step {done}; continue with "
                          f"`ddpm train-autoencoder --resume {s.run_dir}`")
                return s.run_dir
    finish(s)
    return s.run_dir


def _log_row(s: AEState, log, done: int, lr: float, grad_norm) -> None:
    acc = s.accelerator
    mean = acc.reduce(torch.stack(s.window).mean(0), "mean").tolist() if s.window else [float("nan")] * 5
    skipped = s.guard.take_since_log()
    now = time.time()
    rate = (len(s.window) + skipped) / max(now - s.t_last, 1e-9)
    s.window, s.t_last = [], now
    s.bar.set_postfix(loss=f"{mean[0]:.4f}", rec=f"{mean[1]:.4f}", refresh=False)
    if s.main:
        csv.writer(log).writerow([done, *(f"{v:.6f}" for v in mean), f"{lr:.6g}", f"{float(grad_norm):.4f}",
                                  f"{rate:.3f}", f"{now - s.t0:.1f}", skipped])
        log.flush()
        s.monitor.scalars(done, {"train/loss": mean[0], "train/rec": mean[1], "train/kl": mean[2],
                                 "train/g_loss": mean[3], "train/d_loss": mean[4], "train/lr": lr})


def save_state(s: AEState, done: int) -> None:
    """Checkpoint ``done``: autoencoder, EMA, optimizer (both groups), discriminator, loss scaler."""
    s.accelerator.wait_for_everyone()
    if s.main:
        weights = {"discriminator": s.raw_disc.state_dict()} if s.raw_disc is not None else None
        save_checkpoint(s.run_dir, done, s.raw_model.state_dict(), s.ema.state_dict(), s.opt.state_dict(),
                        extra=scaler_state(s.accelerator), keep=s.cfg.train.keep_checkpoints, weights=weights)
    s.accelerator.wait_for_everyone()


def _batches(dataset, n: int, batch_size: int):
    for start in range(0, min(n, len(dataset)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n, len(dataset)))]
        yield torch.stack([it[0] for it in items])


@torch.no_grad()
def measure(autoencoder: KLAutoencoder, held_out, train_set, stats_n: int, device, batch_size: int = 64) -> dict:
    """Reconstruction PSNR (dB, per image on the [0, 1] scale, then averaged) of ``held_out`` through the
    posterior mean, and the mean / std of the posterior means of up to ``stats_n`` training images:
    shift_factor = mean, scale_factor = 1 / std make the diffusion data zero-mean and unit-variance."""
    autoencoder.eval()
    psnrs = []
    for x in _batches(held_out, len(held_out), batch_size):
        x = x.to(device)
        x_rec = autoencoder.decode(autoencoder.posterior(x).mean).clamp(-1, 1)
        mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # [-1, 1] -> [0, 1]
        psnrs.append(10 * torch.log10(1.0 / mse))
    zs = torch.cat([autoencoder.posterior(x.to(device)).mean.float().cpu()
                    for x in _batches(train_set, stats_n, batch_size)])
    mean, std = zs.mean().item(), zs.std().item()
    return {
        "psnr_db": torch.cat(psnrs).mean().item() if psnrs else float("nan"),
        "held_out_images": len(held_out),
        "latent_shape": list(zs.shape[1:]),
        "latent_mean": mean,
        "latent_std": std,
        "latent_channel_mean": zs.mean(dim=(0, 2, 3)).tolist(),
        "latent_channel_std": zs.std(dim=(0, 2, 3)).tolist(),
        "stats_images": len(zs),
        "scale_factor": 1.0 / std,
        "shift_factor": mean,
    }


def finish(s: AEState) -> None:
    """The measurements of the EMA autoencoder (RUN/autoencoder.json), a reconstruction grid, the summary."""
    s.bar.close()
    if s.main:
        steps = s.cfg.train.steps
        stats = {"step": steps, "weights": "ema",
                 **measure(s.ema, s.held_out, s.train_set, s.cfg.autoencoder.stats_n, s.device)}
        (s.run_dir / AE_STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        picks = torch.linspace(0, len(s.held_out) - 1, min(8, len(s.held_out))).round().long().unique()
        x = torch.stack([s.held_out[int(i)][0] for i in picks]).to(s.device)  # spread over the (sorted) data
        with torch.no_grad():
            x_rec = s.ema.decode(s.ema.posterior(x).mean).clamp(-1, 1)
        grid = save_grid(torch.cat([x, x_rec]).cpu(), s.run_dir / "samples" / "reconstructions.png", nrow=len(x),
                         scale=max(1, min(4, 128 // max(x.shape[2:]))))
        s.monitor.image_file("reconstructions", grid, steps)
        s.monitor.scalars(steps, {"eval/psnr_db": stats["psnr_db"]})
        s.monitor.close()
        c, h, w = stats["latent_shape"]
        print(f"done: {steps} steps in {time.time() - s.t0:.0f} s; reconstruction PSNR {stats['psnr_db']:.2f} dB on "
              f"{stats['held_out_images']} held-out images (EMA weights, top row input, bottom reconstruction: "
              f"{grid}); latents {c}x{h}x{w}: mean {stats['latent_mean']:.4f}, std {stats['latent_std']:.4f} -> "
              f"scale factor 1/std = {stats['scale_factor']:.5f} (in {s.run_dir / AE_STATS_FILE})")
        run = shlex.quote(str(s.run_dir))
        config = "mnist_latent" if s.cfg.data.dataset == "mnist" else "folder_latent data.path=..."
        print(f"next:\n  ddpm train --config {config} model.autoencoder={run}")
    s.accelerator.wait_for_everyone()
