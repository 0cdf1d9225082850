"""DreamBooth (Ruiz et al. 2023): ``ddpm finetune TEXT_RUN --method dreambooth finetune.token=sks
finetune.class_word=square data.path=FEW_IMAGES [finetune.lora=true]``.

The few images of a subject are captioned with a rare identifier and the subject's class noun ("a sks square",
:mod:`ddpmlab.data.concept`), and the model is fine-tuned on them, all its weights (an own text encoder's too) or
LoRA adapters of its denoiser (finetune.lora, lora.*).  Prior preservation: before the first training step the
base model draws finetune.class_images images of the class prompts ("a square"; :mod:`ddpmlab.training.class_images`,
RUN/class_images, resumable), and every training step adds their loss:

    L = E[ ||eps_theta(x_t, c) - eps||^2 ] + lambda E[ ||eps_theta(x'_t', c_pr) - eps'||^2 ]   (Ruiz et al. 2023, Eq. 2)

x from the subject's images with caption c, x' from the class images with their prompt c_pr, each with its own
t and noise, lambda = finetune.prior_weight; each training step has train.batch_size of each (the run's objective:
a flow run's velocity loss, a v or x0 prediction's loss).  An identifier the run's own vocabulary lacks is added
to it, its row starting as [UNK]'s, so the base reads it as before.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ddpmlab.data.captions import CaptionedDataset
from ddpmlab.data.concept import class_prompts, concept_images
from ddpmlab.data.images import ImageFolderDataset
from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.errors import ConfigError
from ddpmlab.models.conditioned import bind_condition
from ddpmlab.runs import Run
from ddpmlab.runs.prompts import save_run_prompts, drawing_prompts
from ddpmlab.training.class_images import CLASS_DIR, draw_class_images
from ddpmlab.training.data import StepBatchSampler, describe_data, latent_dataset, step_loader
from ddpmlab.training.distributed import draw_t_and_noise, draw_uniform, micro_batches
from ddpmlab.training.task import StepOutput, Trainee, step_generators
from ddpmlab.training.tasks.finetune_base import FinetuneTask, load_source
from ddpmlab.training.text import TextTraining

UNK_ID = 3  # [UNK] of the own tokenizer (ddpmlab.data.tokenizer.SPECIAL_TOKENS)


def dreambooth_loss(objective, instance: tuple, prior: Optional[tuple], weight: float) -> Tuple[torch.Tensor, ...]:
    """(L, L_instance, L_prior) of Ruiz et al. 2023, Eq. 2: L = L_instance + ``weight`` L_prior.  ``instance`` and
    ``prior`` are ``(net, x0, t, noise, y)``, each net the denoiser with its examples' text bound; ``prior`` None:
    L = L_instance (no prior preservation)."""
    net, x0, t, noise, y = instance
    loss_instance = objective(net, x0, t=t, noise=noise, y=y)
    if prior is None:
        return loss_instance, loss_instance, torch.zeros_like(loss_instance)
    net, x0, t, noise, y = prior
    loss_prior = objective(net, x0, t=t, noise=noise, y=y)
    return loss_instance + weight * loss_prior, loss_instance, loss_prior


class DreamBoothTask(FinetuneTask):
    """Ruiz et al. 2023 on the one loop (module docstring); ``source`` is SRC, loaded already (None: loaded when
    class images are still to be drawn)."""

    log_values = ("loss", "instance", "prior")

    def __init__(self, cfg, init: Optional[dict] = None, source: Optional[Run] = None):
        super().__init__(cfg, init)
        self.source = source
        self.class_prompts: List[str] = []
        self.class_data = None  # the class images (their latents for a latent run) with their captions

    @property
    def prior(self) -> bool:
        return self.cfg.finetune.class_images > 0

    def load_data(self) -> None:
        """The subject's images (:func:`concept_images`), their latents for a latent run, and the captions of both
        them and the class images to come (a frozen encoder embeds them all once)."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.model.num_classes:
            raise ConfigError(f"--method dreambooth: {cfg.finetune.source} is class-conditional (model.num_classes="
                              f"{cfg.model.num_classes}); DreamBooth names its subject in the prompt alone")
        self.dataset = self.pixels = concept_images(cfg)
        if ctx.main:
            print(describe_data(cfg, self.dataset))
        if cfg.model.autoencoder:
            latents, self.latents = latent_dataset(cfg, self.pixels, ctx.accelerator, ctx.main, ctx.progress)
            self.dataset = CaptionedDataset(latents, self.pixels.captions)
        self.class_prompts = class_prompts(cfg, self.pixels.captions) if self.prior else []
        self.text = TextTraining(cfg, list(self.pixels.captions) + self.class_captions())
        line = self.text.load(ctx.accelerator, ctx.main, ctx.progress)
        if line and ctx.main:
            print(line)

    def class_captions(self) -> List[tuple]:
        return [(self.class_prompts[i % len(self.class_prompts)],) for i in range(self.cfg.finetune.class_images)]

    def new_tokens(self, tokenizer: CaptionTokenizer) -> List[Tuple[str, int]]:
        """The identifier, where the own vocabulary lacks it (starting as [UNK]: what the base read for it)."""
        token = self.cfg.finetune.token
        if tokenizer.tokenizer.token_to_id(tokenizer.normalize(token)) is not None:
            return []
        tokenizer.add_token(token)
        return [(token, UNK_ID)]

    def build(self) -> Trainee:
        """The class images first (drawn by SRC, or found from an earlier start), then SRC's network."""
        ctx = self.ctx
        if ctx.main:  # the drawings show the subject's captions, not the class prompts
            save_run_prompts(ctx.run_dir, drawing_prompts(self.pixels.captions, self.cfg.train.sample_n,
                                                          self.cfg.train.seed))
        if self.prior:
            self.class_data = self.load_class_images()
        return super().build()

    def load_class_images(self):
        cfg, ctx = self.cfg, self.ctx
        folder = ctx.run_dir / CLASS_DIR
        if ctx.main:
            draw_class_images(self.base_run, cfg, folder, self.class_prompts, cfg.finetune.class_images,
                              progress=ctx.progress)
        ctx.accelerator.wait_for_everyone()
        self.source = None  # SRC's weights are in the network now, or not needed
        size = list(cfg.data.image_size) * (2 if len(cfg.data.image_size) == 1 else 1)
        images = ImageFolderDataset(folder, tuple(size), cfg.data.channels)
        if cfg.model.autoencoder:
            images = latent_dataset(cfg, images, ctx.accelerator, ctx.main, ctx.progress)[0]
        return CaptionedDataset(images, self.class_captions())

    def base_run(self) -> Run:
        run = self.source if self.source is not None else load_source(Path(self.cfg.finetune.source))
        run.model.to(self.ctx.device)
        run.device = self.ctx.device
        return run

    def batches(self, start: int, stop: int):
        """(subject batch, class batch or None) per training step; the class images in an order of their own."""
        cfg, acc = self.cfg, self.ctx.accelerator
        subject = step_loader(self.dataset, cfg, start, stop, acc)
        if not self.prior:
            return ((b, None) for b in subject)
        sampler = StepBatchSampler(len(self.class_data), cfg.train.batch_size, start, stop, cfg.train.seed + 1,
                                   acc.process_index, acc.num_processes)
        return zip(subject, torch.utils.data.DataLoader(self.class_data, batch_sampler=sampler,
                                                        num_workers=cfg.data.num_workers))

    def examples(self, batch, offset: int, step: int, shared: torch.Generator) -> tuple:
        """(x0, t, noise, y, text) of this process's rows of a batch: t and noise drawn for the global batch, the
        captions of examples ``offset + index`` of the text's list, some dropped."""
        cfg, acc = self.cfg, self.ctx.accelerator
        x0 = batch[0].to(self.ctx.device, non_blocking=True)
        t, noise = draw_t_and_noise(self.objective.sample_timesteps, x0, cfg.train.batch_size, acc.process_index,
                                    shared, cfg.diffusion.offset_noise)
        u = draw_uniform(len(x0), cfg.train.batch_size, acc.process_index, shared)
        return x0, t, noise, None, self.text.condition(self.trainee.raw, batch[2] + offset, step, u)

    def step(self, step: int, batch) -> StepOutput:
        """Eq. 2 on this process's rows: the subject's batch and (prior preservation) the class images', each with
        its own t and noise, backward in train.grad_accum_steps micro-batches."""
        cfg, acc = self.cfg, self.ctx.accelerator
        _, shared = step_generators(cfg.train.seed, step, acc.process_index, self.ctx.device)
        subject = self.examples(batch[0], 0, step, shared)
        prior = self.examples(batch[1], len(self.dataset), step, shared) if batch[1] is not None else None
        k, model = cfg.train.grad_accum_steps, self.trainee.model
        values = torch.zeros(3, device=self.ctx.device)
        parts = list(zip(micro_batches(k, *subject), micro_batches(k, *prior) if prior else [None] * k))
        for j, (sj, pj) in enumerate(parts):
            inst = (bind_condition(model, sj[4]), *sj[:4])
            pri = None if pj is None else (bind_condition(model, pj[4]), *pj[:4])
            with acc.no_sync(model) if j < k - 1 else contextlib.nullcontext():
                with acc.autocast():
                    losses = dreambooth_loss(self.objective, inst, pri, cfg.finetune.prior_weight)
                acc.backward(losses[0] / k)
            values = values + torch.stack([v.detach() for v in losses]) / k
        self.objective.end_step()
        return StepOutput(values[0], values)
