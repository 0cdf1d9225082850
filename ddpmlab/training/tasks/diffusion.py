"""``ddpm train``: a denoiser learns to reverse the forward process (Ho et al. 2020, Algorithm 1).

One training step: x0 from the data (its latents for latent diffusion, Rombach et al. 2022), t and eps
drawn for the global batch from (seed, step), some labels dropped to "no label" (classifier-free
guidance, Ho & Salimans 2022), the objective of ``diffusion.*`` (epsilon, x0, v or EDM; L_simple,
min-SNR or the hybrid with the VLB; or a flow's velocity loss with continuous t, diffusion.process flow),
backward in train.grad_accum_steps micro-batches.  A text run (text.encoder set) conditions each example on
one of its captions, some dropped to the empty one (:mod:`ddpmlab.training.text`).  Every process
draws the same t and eps for the global batch and keeps its rows, so the update is the same for any
number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import time
from pathlib import Path
from typing import Optional, Union

import torch

from ddpmlab.atomic import atomic_write_text
from ddpmlab.config import Config
from ddpmlab.data.audio import random_segments
from ddpmlab.data.captions import CaptionedDataset
from ddpmlab.data.latents import LATENTS_FILE, describe_autoencoder
from ddpmlab.diffusion.objectives import DiffusionObjective, FlowObjective, objective_from_config
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, OptionError, about
from ddpmlab.evaluate.superres import save_comparison, spread_images
from ddpmlab.io.checkpoint import require_run_dir
from ddpmlab.models import build_model, count_parameters
from ddpmlab.models.conditioned import bind_condition, example_condition, low_res, training_condition
from ddpmlab.runs import Output, Run, SamplingRequest, draw_samples, own_sampler, plan_request, save_class_names
from ddpmlab.runs.prompts import load_run_prompts
from ddpmlab.samplers.guidance import drop_labels
from ddpmlab.samplers.registry import get_spec
from ddpmlab.training.data import describe_data, latent_dataset, load_data, step_loader
from ddpmlab.training.distributed import draw_t_and_noise, draw_uniform, micro_batches
from ddpmlab.training.loop import run
from ddpmlab.training.run_folder import new_run_dir
from ddpmlab.training.task import StepOutput, Task, Trainee, step_generators
from ddpmlab.training.text import TextTraining
from ddpmlab.viz.samples import reference_points, save_samples


def train(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False, progress: bool = True) -> Path:
    """Train a denoiser as configured; return the run directory.

    ``resume=True`` continues ``run_dir`` from its newest loadable checkpoint.
    The run directory is locked (RUN/.lock) while training: a second process refuses.
    """
    if cfg.stage != "diffusion":
        raise ConfigError(f"{run_dir} is an autoencoder run (stage {cfg.stage}); continue it with "
                          f"`ddpm train-autoencoder --resume {run_dir}`")
    if cfg.reflow.teacher:
        raise ConfigError(f"{run_dir or 'the config'} is a reflow of {cfg.reflow.teacher} (reflow.teacher): "
                          f"continue it with `ddpm reflow --resume {run_dir or 'RUN'}`, or set reflow.teacher=null to "
                          "train anew")
    with train_names():  # an unknown train.sample_sampler fails now, not after the last step
        with about("sampler"):
            get_spec(own_sampler(cfg))
    if cfg.model.autoencoder:
        describe_autoencoder(cfg.model.autoencoder)  # a bad path fails before the data is read
    started = time.time()  # train.minutes counts from here: set-up, training and the final samples
    run_dir = require_run_dir(run_dir) if resume else Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    return run(DiffusionTask(cfg), run_dir, resume, progress, started=started)


# how a run's config names the options of its sample drawings
SAMPLE_OPTIONS = {"sampler": "train.sample_sampler", "steps": "train.sample_steps", "guidance": "train.sample_guidance"}


@contextlib.contextmanager
def train_names():
    """An error about a sampling option, named as the run's config names it (train.sample_*)."""
    try:
        yield
    except OptionError as e:
        raise ConfigError(e.named(SAMPLE_OPTIONS)) from None


class DiffusionTask(Task):
    """Ho et al. 2020, Algorithm 1 (with the objectives of ``diffusion.*``) as a task of the training loop."""

    uses_budget = True
    evaluates = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        self.dataset = self.pixels = None
        self.latents: Optional[dict] = None  # latent diffusion: what RUN/latents.json records
        self.objective: Optional[Union[DiffusionObjective, FlowObjective]] = None
        self.text: Optional[TextTraining] = None  # a text run's captions (text.encoder set)

    def read_data(self):
        """The training examples as data.* names them (a fine-tuning on a concept's few images: as it reads them)."""
        return load_data(self.cfg)

    def load_data(self) -> None:
        ctx = self.ctx
        self.dataset = self.pixels = self.read_data()
        if ctx.main:
            print(describe_data(self.cfg, self.dataset))
        if self.cfg.model.autoencoder:  # latent diffusion: the denoiser trains on the encoded data
            self.dataset, self.latents = latent_dataset(self.cfg, self.pixels, ctx.accelerator, ctx.main, ctx.progress)
        if self.cfg.text.encoder:  # text-to-image: (x, y, index) and each index's captions
            streamed = getattr(self.pixels, "streamed", False)  # shards: (x, y, texts), texts drawn per step
            self.text = TextTraining(self.cfg, self.pixels.all_captions() if streamed else self.pixels.captions)
            if self.latents is not None and not streamed:
                self.dataset = CaptionedDataset(self.dataset, self.pixels.captions)
            line = self.text.load(ctx.accelerator, ctx.main, ctx.progress)
            if line and ctx.main:
                print(line)

    def build(self) -> Trainee:
        """The denoiser (seeded by train.seed), its EMA copy and AdamW; the objective of diffusion.loss_type."""
        cfg, device = self.cfg, self.ctx.device
        if self.ctx.main:
            if self.latents is not None:
                atomic_write_text(self.ctx.run_dir / LATENTS_FILE, json.dumps(self.latents, indent=2) + "\n")
            names = list(getattr(self.pixels, "class_names", []))
            if names != [str(i) for i in range(len(names))]:  # names that are only the indices add nothing
                save_class_names(self.ctx.run_dir, names)  # `ddpm sample RUN --class cat` then works
        if self.text is not None and self.ctx.main:
            self.text.save_prompts(self.ctx.run_dir)  # the drawings' prompts: a few training captions
        torch.manual_seed(cfg.train.seed)
        # learned variance (diffusion.variance): twice the output channels; a text run's own encoder is trained
        # with it (in the optimiser, the EMA and the checkpoint), a frozen one is not
        model = build_model(cfg) if self.text is None else self.text.build(self.ctx.run_dir, self.ctx.accelerator)
        ema = copy.deepcopy(model).requires_grad_(False)
        # fused: one pass over each tensor instead of ~10; resumes keep the stored choice
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                weight_decay=cfg.train.weight_decay, fused=device.type in ("cpu", "cuda"))
        # its state (the importance-sampling history) is checkpointed
        self.objective = objective_from_config(cfg, self.schedule, gather=self.ctx.accelerator.gather)
        return Trainee(model, model, ema, opt)

    def load_state(self, ckpt: dict) -> None:
        self.objective.load_state_dict(ckpt["state"].get("objective"))

    def state(self) -> dict:
        return {"objective": self.objective.state_dict()}

    def describe(self) -> str:
        acc = self.ctx.accelerator
        return (f"run {self.ctx.run_dir}: {count_parameters(self.trainee.raw) / 1e6:.2f}M parameters, "
                f"{len(self.dataset)} examples, {self.cfg.train.steps} steps on {self.ctx.device} "
                f"x{acc.num_processes}, {self.ctx.precision}")

    def images(self):
        return self.pixels  # evaluation draws pixels (a latent run's samples decoded)

    def batches(self, start: int, stop: int):
        return step_loader(self.dataset, self.cfg, start, stop, self.ctx.accelerator)

    def step(self, step: int, batch) -> StepOutput:
        """Algorithm 1, lines 2-5, on this process's rows of the global batch."""
        cfg, acc, device = self.cfg, self.ctx.accelerator, self.ctx.device
        x0, y = batch[:2]
        own, shared = step_generators(cfg.train.seed, step, acc.process_index, device)
        x0 = x0.to(device, non_blocking=True)  # line 2: x_0 ~ q(x_0)
        if cfg.data.crop:  # a vocoder: a random segment of each clip
            x0 = random_segments(x0, cfg.data.crop, own)
        y = y.to(device) if cfg.model.num_classes else None
        # lines 3-4: t ~ Uniform({1..T}) (or importance-sampled; a flow's t in [0, 1]) and eps ~ N(0, I)
        t, noise = draw_t_and_noise(self.objective.sample_timesteps, x0, cfg.train.batch_size, acc.process_index,
                                    shared, cfg.diffusion.offset_noise)
        if y is not None:  # classifier-free guidance: some labels become "no label" (drawn as t and eps are)
            u = draw_uniform(len(y), cfg.train.batch_size, acc.process_index, shared)
            y = drop_labels(y, cfg.train.label_dropout, cfg.model.num_classes, u=u)
        cond = training_condition(x0, cfg, generator=own)  # SR3: x0's low-res version upsampled; a vocoder: its mel
        if self.text is not None:  # the examples' captions of this step, some dropped (drawn as labels are)
            u = draw_uniform(len(x0), cfg.train.batch_size, acc.process_index, shared)
            cond = self.text.condition(self.trainee.raw, batch[2], step, u)
        loss = self.backward_micro_batches(x0, t, noise, y, cond)  # line 5: the gradient of the loss
        return StepOutput(loss, loss.reshape(1))

    def backward_micro_batches(self, x0, t, noise, y, cond=None) -> torch.Tensor:
        """Backward of the loss in train.grad_accum_steps micro-batches; returns the step's loss (detached).

        ``cond``: the conditioning of x0's rows: an image-conditioned model's, a text run's (TextCondition or
        PromptTokens), or None."""
        acc, k, model = self.ctx.accelerator, self.cfg.train.grad_accum_steps, self.trainee.model
        loss = torch.zeros((), device=self.ctx.device)
        for j, (xj, tj, nj, yj, cj) in enumerate(micro_batches(k, x0, t, noise, y, cond)):
            net = model if cj is None else bind_condition(model, cj)
            # gradient accumulation: the mean of k micro-batch losses; all-reduce after the last only
            with acc.no_sync(model) if j < k - 1 else contextlib.nullcontext():
                with acc.autocast():
                    part = self.objective(net, xj, t=tj, noise=nj, y=yj) / k
                acc.backward(part)
            loss = loss + part.detach()
        self.objective.end_step()  # importance sampling: the history learns this step's t once, after all k
        return loss

    # -- pictures and measurements
    def draw_samples(self, steps: Optional[int] = None) -> tuple:
        """(run, plan, samples, truth) of the EMA weights, planned as every front end plans a sampler call (the
        run's own variance for ddpm; a conditional run's samples cycle through the classes; a text run's are
        grouped by its prompts, RUN/samples/prompts.txt; a super-resolution run upscales images spread over its
        data, a vocoder re-synthesises clips spread over its data from their mel spectrograms, whose originals
        are ``truth``; else truth is None).
        ``steps``: instead of train.sample_steps (the budget's timing)."""
        cfg = self.cfg
        run = Run(cfg, self.trainee.ema, self.schedule, self.ctx.device, self.ctx.run_dir)
        truth = spread_images(self.dataset, cfg.train.sample_n) if cfg.model.condition != "none" else None
        n = cfg.train.sample_n if truth is None else len(truth)
        request = SamplingRequest(own_sampler(cfg), steps or cfg.train.sample_steps, n=n, seed=cfg.train.seed,
                                  cond=None if truth is None else example_condition(truth, cfg))
        with train_names():
            plan = plan_request(run, request, log=lambda m: None)
        return run, plan, draw_samples(run, plan, plan.n, seed=cfg.train.seed, progress=False), truth

    def draw(self, tag: str) -> Path:
        """RUN/samples/<tag>.png from the EMA weights; super-resolution runs: triples of input, upscale, truth
        (a vocoder's: its re-syntheses as any sound run's samples)."""
        run, plan, x, truth = self.draw_samples()
        path = self.ctx.run_dir / "samples" / f"{tag}.png"
        if truth is not None and not run.is_audio:
            return save_comparison(path, low_res(truth, self.cfg), x, truth)
        ref = None if self.dataset.is_image or run.is_audio else reference_points(self.dataset)
        return save_samples(run, x, Output(path, is_folder=False), title=f"samples at {tag}", reference=ref,
                            nrow=plan.per_prompt)[0]

    def drawing_seconds(self) -> float:
        """About how long the final samples take: the planned sampler timed with 1 and with 4 steps (the
        difference is the cost of a step, the rest what a call costs once), extrapolated to train.sample_steps."""
        def timed(steps: int) -> float:
            t0 = time.perf_counter()
            self.draw_samples(steps=steps)
            return time.perf_counter() - t0

        steps = self.cfg.train.sample_steps
        one = timed(1)
        if steps == 1:
            return one
        per_step = max(timed(4) - one, 0.0) / 3
        return one + per_step * (steps - 1)

    def evaluate(self, done: int, final: bool) -> None:
        self.monitor.maybe_evaluate(done, self.trainee.ema, self.schedule, final=final)

    def finish(self, seconds: float, skipped: int) -> None:
        """The final samples (EMA), the summary and what to try next."""
        cfg, steps = self.cfg, self.cfg.train.steps
        path = self.draw("final")
        self.monitor.image_file("samples", path, steps)
        print(f"done: {steps} steps in {seconds:.0f} s; samples (EMA) -> {path}"
              + (f"; {skipped} steps skipped (non-finite loss or gradient)" if skipped else ""))
        prompts = load_run_prompts(self.ctx.run_dir) if self.text is not None else []
        print(next_commands(self.ctx.run_dir, condition=cfg.model.condition,
                            sampler=own_sampler(cfg), steps=cfg.train.sample_steps,
                            prompt=prompts[0] if prompts else None))


def next_commands(run_dir: Path, condition: str = "none", sampler: str = "ddim", steps: int = 50,
                  prompt: Optional[str] = None) -> str:
    """The commands to try on a finished run: sampling as its final samples were drawn (a super-resolution
    run, model.condition low_res, upscales instead, a vocoder, mel, re-synthesises; a text run is asked for
    ``prompt``)."""
    run_q = shlex.quote(str(run_dir))
    first = {"low_res": f"  ddpm upscale {run_q} --image low.png",
             "mel": f"  ddpm vocode {run_q} --audio in.wav --sampler {sampler} --steps {steps}"}.get(
        condition, f"  ddpm sample {run_q} --sampler {sampler} --steps {steps}")
    if prompt is not None:
        first += f" --prompt {shlex.quote(prompt)}"
    return "\n".join(["next:", first, f"  ddpm eval {run_q}", f"  ddpm viz loss {run_q}"])
