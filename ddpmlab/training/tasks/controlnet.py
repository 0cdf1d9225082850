"""``ddpm train-controlnet BASE [key=value ...]``: a ControlNet (Zhang et al. 2023) learns to steer a frozen UNet run.

A new run whose trainee is a ControlNet (:mod:`ddpmlab.models.controlnet`) copied from BASE's EMA UNet; BASE stays
frozen (eval mode, no gradient) and outside the checkpoints, which hold the ControlNet, its EMA and AdamW's state
alone.  One training step is ``ddpm train``'s (Ho et al. 2020, Algorithm 1, or a flow's: the same t, noise and
objective) on the steered denoiser base(x_t, t, y, residuals = ControlNet(x_t, t, y, c)), c the control image of
each training image: computed from it by controlnet.detector (:mod:`ddpmlab.data.control`), or read from the
paired folder (controlnet.detector null).  Labels are dropped to "no label" at controlnet.label_dropout, so that
the control alone can say what to draw.  The run's config is BASE's with the controlnet section; train.*, data.*
and controlnet.* may change on the command line.  Sample BASE with it: ``ddpm sample BASE --controlnet RUN
--control picture.png``.

A text base (text.encoder set) reads each image's captions as ``ddpm train`` does (:mod:`ddpmlab.training.text`:
one drawn per step, an own encoder's token ids or a frozen one's cached embeddings), with controlnet.label_dropout
of them emptied (Zhang et al. 2023, Sec. 3.3: 50 % of the prompts); base and ControlNet read the same encoding.
A latent base (model.autoencoder) trains on its cached latents while the controls stay pictures of the images'
size, computed from (or paired with) the pixels of the same examples; the hint encoder brings them down.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shlex
import warnings
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ddpmlab.config import Config, config_from_dict
from ddpmlab.config.load import apply_overrides
from ddpmlab.data import image_shape
from ddpmlab.data.control import PairedControls, control_folder, detector
from ddpmlab.diffusion.objectives import objective_from_config
from ddpmlab.errors import ConfigError, DDPMError, about
from ddpmlab.io.images import save_grid
from ddpmlab.models.conditioned import bind_condition
from ddpmlab.models.controlnet import ControlledUNet, build_controlnet, control_settings
from ddpmlab.runs import Run, SamplingRequest, draw_samples, load_run, own_sampler, plan_request
from ddpmlab.samplers.guidance import drop_labels
from ddpmlab.samplers.registry import get_spec
from ddpmlab.training.distributed import draw_t_and_noise, draw_uniform, micro_batches
from ddpmlab.training.loop import run
from ddpmlab.training.run_folder import resume_derived
from ddpmlab.training.task import StepOutput, Trainee, adamw, step_generators
from ddpmlab.training.tasks.diffusion import DiffusionTask, train_names


class ControlNetTask(DiffusionTask):
    """``ddpm train``'s data, objective and steps on the frozen ``base`` run steered by a ControlNet, which alone
    trains (and alone is averaged and checkpointed)."""

    resume_command = "ddpm train-controlnet --resume"
    bar_label = "ControlNet"
    evaluates = False  # the EMA is a ControlNet, not a denoiser: no FID during training

    def __init__(self, cfg: Config, base: Run):
        super().__init__(cfg)
        self.base = base.model.eval().requires_grad_(False)
        self.base_checkpoint = base.checkpoint
        self.detect = detector(cfg) if cfg.controlnet.detector else None

    def load_data(self) -> None:
        """``ddpm train``'s data (latents, captions), each example with the pixels its control comes from: the
        image itself (a detector's input) or its paired picture (controlnet.detector null)."""
        super().load_data()
        sources = ExampleImages(self.pixels)
        if self.detect is None:  # a control picture per image, at the same place below the control folder
            folder = control_folder(self.cfg)
            sources = PairedControls(self.pixels, folder, control_settings(self.cfg)[0]).controls
            if self.ctx.main:
                print(f"controls: {len(sources):,} pictures from {folder}")
        self.dataset = WithControls(self.dataset, sources)
        if self.text is not None:  # the paper's share of empty prompts, drawn as ddpm train draws its own
            c = self.cfg
            self.text.cfg = dataclasses.replace(c, text=dataclasses.replace(
                c.text, caption_dropout=c.controlnet.label_dropout))
        k = self.cfg.model.num_classes
        if k and self.pixels.num_classes > k:
            raise ConfigError(f"data.*: the data has {self.pixels.num_classes} classes but the base "
                              f"{self.cfg.controlnet.base} knows {k} (model.num_classes); give at most {k} classes")

    def build(self) -> Trainee:
        """The ControlNet copied from the base (its hint encoder drawn from train.seed), its EMA and AdamW."""
        cfg, device = self.cfg, self.ctx.device
        self.base.to(device)
        torch.manual_seed(cfg.train.seed)
        net = build_controlnet(cfg, self.base)
        ema = copy.deepcopy(net).requires_grad_(False)
        self.objective = objective_from_config(cfg, self.schedule, gather=self.ctx.accelerator.gather)
        return Trainee(net, net, ema, adamw(cfg, net.parameters(), device))

    def load_state(self, ckpt: dict) -> None:
        super().load_state(ckpt)
        was = ckpt["state"].get("base_checkpoint")
        if was and was != self.base_checkpoint and self.ctx.main:
            warnings.warn(f"the base {self.cfg.controlnet.base} now loads {self.base_checkpoint}, but this ControlNet "
                          f"trained on its {was}: the run continues on other base weights")

    def state(self) -> dict:
        return {**super().state(), "base_checkpoint": self.base_checkpoint}

    def describe(self) -> str:
        cfg, ctx, net = self.cfg, self.ctx, self.trainee.raw
        what = cfg.controlnet.detector or f"pictures in {control_folder(cfg)}"
        return (f"ControlNet {ctx.run_dir} on the frozen {cfg.controlnet.base} ({self.base_checkpoint}, EMA): "
                f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters train, control: {what}, "
                f"{len(self.dataset)} examples, {cfg.train.steps} steps on {ctx.device} "
                f"x{ctx.accelerator.num_processes}, {ctx.precision}")

    def controls(self, sources: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The control images of examples whose control ``sources`` are (B, C, H, W): their pixels in [-1, 1]
        (detected here) or their paired pictures in [0, 1] (as they are)."""
        return self.detect(sources, generator) if self.detect is not None else sources

    def step(self, step: int, batch) -> StepOutput:
        """Algorithm 1, lines 2-5, through the steered base, on this process's rows of the global batch
        (x0, y, index, control source)."""
        cfg, acc, device = self.cfg, self.ctx.accelerator, self.ctx.device
        own, shared = step_generators(cfg.train.seed, step, acc.process_index, device)
        x0 = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device) if cfg.model.num_classes else None
        control = self.controls(batch[3].to(device), own)
        t, noise = draw_t_and_noise(self.objective.sample_timesteps, x0, cfg.train.batch_size, acc.process_index,
                                    shared, cfg.diffusion.offset_noise)
        if y is not None:  # some labels become "no label": the control alone must say what to draw
            u = draw_uniform(len(y), cfg.train.batch_size, acc.process_index, shared)
            y = drop_labels(y, cfg.controlnet.label_dropout, cfg.model.num_classes, u=u)
        text = None
        if self.text is not None:  # the examples' captions of this step, some emptied (drawn as labels are)
            u = draw_uniform(len(x0), cfg.train.batch_size, acc.process_index, shared)
            text = self.text.condition(self.base, batch[2], step, u)
        loss = self.backward_micro_batches(x0, t, noise, y, control, text)
        return StepOutput(loss, loss.reshape(1))

    def backward_micro_batches(self, x0, t, noise, y, cond=None, text=None) -> torch.Tensor:
        """``ddpm train``'s backward in train.grad_accum_steps micro-batches, through the base steered by the
        ControlNet with the rows' control images ``cond`` (and a text base's ``text``); the step's loss."""
        acc, k, model = self.ctx.accelerator, self.cfg.train.grad_accum_steps, self.trainee.model
        loss = torch.zeros((), device=self.ctx.device)
        for j, (xj, tj, nj, yj, cj, sj) in enumerate(micro_batches(k, x0, t, noise, y, cond, text)):
            net = ControlledUNet(self.base, [(model, cj, 1.0)])
            net = net if sj is None else bind_condition(net, sj)
            with acc.no_sync(model) if j < k - 1 else contextlib.nullcontext():
                with acc.autocast():
                    part = self.objective(net, xj, t=tj, noise=nj, y=yj) / k
                acc.backward(part)
            loss = loss + part.detach()
        self.objective.end_step()
        return loss

    # -- pictures
    def draw_samples(self, steps: Optional[int] = None) -> tuple:
        """(run, plan, samples, controls): the EMA ControlNet on the base, with the controls of train.sample_n
        training images spread over the data, each sample with its image's label (if any) and a text base's with
        its image's first caption, as the base's own samples are guided; the controls are those of the images
        (a scribble's drawn from train.seed)."""
        cfg = self.cfg
        n = min(cfg.train.sample_n, len(self.dataset))
        rows = [self.dataset[i * len(self.dataset) // n] for i in range(n)]
        g = torch.Generator(device=self.ctx.device).manual_seed(cfg.train.seed)
        control = self.controls(torch.stack([r[3] for r in rows]).to(self.ctx.device), g)
        model = ControlledUNet(self.base, [(self.trainee.ema, control, 1.0)])
        run_ = Run(cfg, model, self.schedule, self.ctx.device, self.ctx.run_dir, class_names=[], prompts=[])
        prompts = [self.pixels.captions[int(r[2])][0] for r in rows] if self.text is not None else None
        request = SamplingRequest(own_sampler(cfg), steps or cfg.train.sample_steps, n=1 if prompts else n,
                                  seed=cfg.train.seed, prompts=prompts)
        with train_names():
            plan = plan_request(run_, request, log=lambda m: None)
        if plan.labels is not None:
            plan.labels = torch.stack([torch.as_tensor(r[1]) for r in rows]).long()
        return run_, plan, draw_samples(run_, plan, n, seed=cfg.train.seed, progress=False), control.cpu()

    def draw(self, tag: str) -> Path:
        """RUN/samples/<tag>.png: rows of eight controls (white on black), each row followed by its samples."""
        _, _, x, control = self.draw_samples()
        c = control if control.shape[1] == x.shape[1] else control[:, :1].expand(-1, x.shape[1], -1, -1)
        tiles = torch.cat([torch.cat([c[i:i + 8] * 2 - 1, x[i:i + 8]]) for i in range(0, len(x), 8)])
        return save_grid(tiles, self.ctx.run_dir / "samples" / f"{tag}.png", nrow=8, scale=2)

    def finish(self, seconds: float, skipped: int) -> None:
        path = self.draw("final")
        self.monitor.image_file("samples", path, self.cfg.train.steps)
        print(f"done: {self.cfg.train.steps} steps in {seconds:.0f} s; controls and samples (EMA) -> {path}"
              + (f"; {skipped} steps skipped (non-finite loss or gradient)" if skipped else ""))
        base, me = shlex.quote(self.cfg.controlnet.base), shlex.quote(str(self.ctx.run_dir))
        prompt = " --prompt 'what to draw'" if self.text is not None else ""
        print(f"try: ddpm sample {base} --controlnet {me} --control picture.png{prompt}")


class ExampleImages(torch.utils.data.Dataset):
    """The pixels of a dataset's examples, ``ds[i] == x_i`` (C, H, W) in [-1, 1]: a detector's input."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index][0]


class WithControls(torch.utils.data.Dataset):
    """A task's examples with their control sources: ``ds[i] == (x, y, i, source_i)``, x what the denoiser
    learns (pixels or latents), source_i the pixels or the paired picture the control of example i comes from."""

    def __init__(self, examples, sources):
        self.examples, self.sources = examples, sources
        self.is_image, self.num_classes = True, getattr(examples, "num_classes", 0)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        x, y = self.examples[index][:2]
        return x, y, index, self.sources[index]


# ----------------------------------------------------------------------------- a new run on a base

def check_base(bcfg: Config, base) -> None:
    """Refuse, in one line, a base a ControlNet cannot steer here: no plain UNet (pixels or latents, classes or
    text), a student, a ControlNet, streamed shards."""
    why = None
    if bcfg.controlnet.base:
        why = f"it is itself a ControlNet (of {bcfg.controlnet.base}); give its base"
    elif bcfg.model.kind != "unet":
        why = f"model.kind is {bcfg.model.kind}; a ControlNet copies a UNet's encoder"
    elif bcfg.distill.teacher:
        why = f"it is a distilled student (of {bcfg.distill.teacher}), which samples by its own rules"
    elif bcfg.model.condition != "none" or bcfg.diffusion.prediction == "edm":
        why = "its UNet is wrapped (model.condition or EDM preconditioning); give a plain UNet run"
    if why:
        raise DDPMError(f"'{base}' cannot carry a ControlNet: {why}")


def _allowed(key: str) -> bool:
    section = key.partition(".")[0]
    return section in ("train", "data") or (section == "controlnet" and key != "controlnet.base")


def controlnet_config(bcfg: Config, base, overrides: Sequence[str] = ()) -> Config:
    """The config of a ControlNet on BASE (its config ``bcfg``): BASE's, with controlnet.base and the key=value
    ``overrides`` of train.*, data.* and controlnet.*; the data must have BASE's image shape."""
    check_base(bcfg, base)
    d = bcfg.to_dict()
    for section in ("reflow", "finetune", "lora"):  # BASE's history, not this run's (its weights come merged)
        d.pop(section, None)
    d["controlnet"]["base"], d["train"]["name"] = str(base), None
    apply_overrides(d, overrides, _allowed, lambda key: (
        f"command line: {key} cannot change in a ControlNet run (its model and diffusion are the base's); it takes "
        "train.*, data.* and controlnet.*"), "controlnet.detector=edges")
    cfg = config_from_dict(d, source=f"{base} + command line")
    if cfg.data.dataset == "webdataset":
        raise ConfigError("data.dataset=webdataset: a ControlNet pairs each numbered example with its control "
                          "picture, and streamed shards number none; give the images as a folder "
                          "(data.dataset=folder data.path=DIR)")
    if image_shape(cfg) != image_shape(bcfg):
        raise ConfigError(f"command line: data.* gives images of shape {image_shape(cfg)}, but the base '{base}' "
                          f"draws {image_shape(bcfg)}; set data.image_size and data.channels to match")
    control_settings(cfg)  # the hint encoder's widths fit the denoiser
    return cfg


def train_controlnet(base=None, overrides: Optional[List[str]] = None, resume_dir=None, progress: bool = True,
                     stop_after: Optional[int] = None) -> Path:
    """``ddpm train-controlnet``: a new ControlNet on BASE beside it (or in train.out_dir/train.name), or
    ``resume_dir`` continued (with the key=value changes a resumed ``ddpm train`` takes); its folder.
    ``stop_after``: save and stop after this many training steps in all."""
    overrides = list(overrides or [])
    if resume_dir is not None:
        run_dir, cfg = resume_derived(resume_dir, overrides, "controlnet.base", "ControlNet")
        source = load_run(cfg.controlnet.base, "ema", "cpu")
    else:
        source = load_run(base, "ema", "cpu")
        cfg = controlnet_config(source.cfg, base, overrides)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        what = cfg.controlnet.detector or "pictures"
        run_dir = (Path(cfg.train.out_dir) / cfg.train.name if cfg.train.name
                   else Path(base).parent / f"{Path(base).name}-controlnet-{what}-{stamp}")
        print(f"ControlNet on {base} ({source.checkpoint}, EMA; control: {what}): {run_dir}")
    with train_names():  # an unknown train.sample_sampler fails now, not after the last step
        with about("sampler"):
            get_spec(own_sampler(cfg))
    return run(ControlNetTask(cfg, source), run_dir, resume_dir is not None, progress, stop_after=stop_after)
