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

import copy
import json
import shlex
from pathlib import Path
from typing import Optional

import torch

from ddpmlab.atomic import atomic_write_text
from ddpmlab.config import Config, validate
from ddpmlab.data.latents import AE_STATS_FILE
from ddpmlab.errors import ConfigError
from ddpmlab.io.checkpoint import require_run_dir
from ddpmlab.io.images import save_grid
from ddpmlab.models import count_parameters
from ddpmlab.models.autoencoder import (
    KLAutoencoder,
    PatchDiscriminator,
    adaptive_weight,
    build_autoencoder,
    hinge_d_loss,
)
from ddpmlab.training.data import describe_data, load_data, step_loader
from ddpmlab.training.loop import run
from ddpmlab.training.run_folder import new_run_dir
from ddpmlab.training.task import StepOutput, Task, Trainee, step_generators

HOLDOUT_SEED = 7919  # the held-out split is seeded apart from the batches (train.seed + this)


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
        new_run_dir(cfg, tag="-autoencoder", resume_command="ddpm train-autoencoder --resume")
    return run(AutoencoderTask(cfg), run_dir, resume, progress)


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


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-pixel |x - x_hat| (l1) or (x - x_hat)^2 (l2)."""
    diff = x_rec.float() - x.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


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




class AutoencoderTask(Task):
    """The first stage of latent diffusion as a task of the training loop: the autoencoder, its EMA and the
    optional PatchGAN discriminator (checkpointed beside it), one AdamW with a parameter group each."""

    resume_command = "ddpm train-autoencoder --resume"
    bar_label = "autoencoder"
    log_values = ("loss", "rec", "kl", "g_loss", "d_loss")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.dataset = self.train_set = self.held_out = None
        self.disc: Optional[torch.nn.Module] = None  # prepared; None without autoencoder.discriminator
        self.raw_disc: Optional[PatchDiscriminator] = None
        self.adversarial = False  # the current training step trains the discriminator too

    def load_data(self) -> None:
        self.dataset = load_data(self.cfg)
        if not self.dataset.is_image:
            raise ConfigError(f"data.dataset={self.cfg.data.dataset}: an autoencoder needs images")
        if self.ctx.main:
            print(describe_data(self.cfg, self.dataset))
        self.train_set, self.held_out = split_holdout(self.dataset, self.cfg.autoencoder.holdout, self.cfg.train.seed)

    def build(self) -> Trainee:
        model, ema, self.raw_disc, opt = build_networks(self.cfg, self.dataset.sample_shape[0], self.ctx.device)
        return Trainee(model, model, ema, opt)

    def load_state(self, ckpt: dict) -> None:
        if self.raw_disc is not None:
            self.raw_disc.load_state_dict(ckpt["weights"]["discriminator"])

    def weights(self) -> dict:
        return {"discriminator": self.raw_disc.state_dict()} if self.raw_disc is not None else {}

    def prepare(self, trainee: Trainee) -> Trainee:
        acc = self.ctx.accelerator
        if self.raw_disc is None:
            model, opt = acc.prepare(trainee.model, trainee.opt)
        else:
            model, self.disc, opt = acc.prepare(trainee.model, self.raw_disc, trainee.opt)
            self.disc.train()
        trainee.ema.to(acc.device)
        return Trainee(model, acc.unwrap_model(model), trainee.ema, opt)

    def describe(self) -> str:
        cfg, acc = self.cfg, self.ctx.accelerator
        c, h, w = self.dataset.sample_shape
        f = self.trainee.raw.downsampling
        disc = (f", discriminator {count_parameters(self.raw_disc) / 1e6:.2f}M from step {cfg.autoencoder.disc_start}"
                if self.raw_disc is not None else "")
        return (f"run {self.ctx.run_dir}: autoencoder {count_parameters(self.trainee.raw) / 1e6:.2f}M parameters "
                f"(latent {cfg.autoencoder.latent_channels}x{h // f}x{w // f}){disc}, {len(self.train_set)} training / "
                f"{len(self.held_out)} held-out images, {cfg.train.steps} steps on {self.ctx.device} "
                f"x{acc.num_processes}, {self.ctx.precision}")

    def batches(self, start: int, stop: int):
        return ((x, None) for x, _ in step_loader(self.train_set, self.cfg, start, stop, self.ctx.accelerator))

    def step(self, step: int, batch) -> StepOutput:
        """The autoencoder's loss (and the discriminator's after disc_start), both backward."""
        cfg, a, acc = self.cfg, self.cfg.autoencoder, self.ctx.accelerator
        model, raw = self.trainee.model, self.trainee.raw
        own, _ = step_generators(cfg.train.seed, step, acc.process_index, self.ctx.device)
        x = batch[0].to(self.ctx.device, non_blocking=True)
        adversarial = self.disc is not None and step >= a.disc_start
        zero = torch.zeros((), device=self.ctx.device)
        with acc.autocast():
            x_rec, kl = model(x, generator=own)  # z ~ q(z|x) by the reparameterisation
            rec = reconstruction_loss(x_rec, x, a.loss)
            kl_term = kl.float().mean() / x[0].numel()  # KL summed over latent dims, per pixel as rec is
            loss = rec + a.kl_weight * kl_term
            g_loss = zero
            if adversarial:
                g_loss = -self.disc(x_rec).float().mean()
                weight = a.disc_weight
                if a.disc_adaptive:
                    weight = weight * adaptive_weight(rec, g_loss, raw.vae.decoder.conv_out.weight)
                loss = loss + weight * g_loss
        acc.backward(loss)
        d_loss = zero
        if adversarial:
            for p in self.disc.parameters():  # the generator's loss must not train the discriminator
                p.grad = None
            with acc.autocast():
                d_loss = hinge_d_loss(self.disc(x.detach()).float(), self.disc(x_rec.detach()).float())
            acc.backward(d_loss)
        self.adversarial = adversarial
        values = torch.stack([loss.detach().float(), rec.detach(), kl_term.detach(), g_loss.detach(), d_loss.detach()])
        return StepOutput((loss + d_loss).detach(), values)

    def clip_gradients(self) -> torch.Tensor:
        clip = self.cfg.train.grad_clip or float("inf")
        grad_norm = self.ctx.accelerator.clip_grad_norm_(self.trainee.model.parameters(), clip)
        if self.adversarial:
            self.ctx.accelerator.clip_grad_norm_(self.disc.parameters(), clip)
        return grad_norm

    def finish(self, seconds: float, skipped: int) -> None:
        """The measurements of the EMA autoencoder (RUN/autoencoder.json), a reconstruction grid, the summary."""
        run_dir, steps, ema = self.ctx.run_dir, self.cfg.train.steps, self.trainee.ema
        stats = {"step": steps, "weights": "ema",
                 **measure(ema, self.held_out, self.train_set, self.cfg.autoencoder.stats_n, self.ctx.device)}
        atomic_write_text(run_dir / AE_STATS_FILE, json.dumps(stats, indent=2) + "\n")  # a kill keeps the old one
        picks = torch.linspace(0, len(self.held_out) - 1, min(8, len(self.held_out))).round().long().unique()
        x = torch.stack([self.held_out[int(i)][0] for i in picks]).to(self.ctx.device)  # spread over the data
        with torch.no_grad():
            x_rec = ema.decode(ema.posterior(x).mean).clamp(-1, 1)
        grid = save_grid(torch.cat([x, x_rec]).cpu(), run_dir / "samples" / "reconstructions.png", nrow=len(x),
                         scale=max(1, min(4, 128 // max(x.shape[2:]))))
        self.monitor.image_file("reconstructions", grid, steps)
        self.monitor.scalars(steps, {"eval/psnr_db": stats["psnr_db"]})
        c, h, w = stats["latent_shape"]
        print(f"done: {steps} steps in {seconds:.0f} s; reconstruction PSNR {stats['psnr_db']:.2f} dB on "
              f"{stats['held_out_images']} held-out images (EMA weights, top row input, bottom reconstruction: "
              f"{grid}); latents {c}x{h}x{w}: mean {stats['latent_mean']:.4f}, std {stats['latent_std']:.4f} -> "
              f"scale factor 1/std = {stats['scale_factor']:.5f} (in {run_dir / AE_STATS_FILE})")
        config = "mnist_latent" if self.cfg.data.dataset == "mnist" else "folder_latent data.path=..."
        print(f"next:\n  ddpm train --config {config} model.autoencoder={shlex.quote(str(run_dir))}")
