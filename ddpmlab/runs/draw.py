"""Drawing samples as a plan says: fresh samples, an image-conditioned or text run's, a latent run's decoded."""

from __future__ import annotations

from typing import Optional

import torch

from ddpmlab.errors import OPTION, ConfigError, OptionError
from ddpmlab.models.conditioned import bind_condition
from ddpmlab.runs.load import Run
from ddpmlab.runs.request import SamplingPlan
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import TextGuidance, guided


def draw_samples(run: Run, plan: SamplingPlan, n: Optional[int] = None, *, seed: Optional[int] = None,
                 batch_size: int = 256, progress: bool = True, callback=None) -> torch.Tensor:
    """``n`` samples (default the plan's) of ``run`` as ``plan`` says, from noise seed ``seed`` (default
    the plan's; batch b draws with seed + b): (n, *shape) float32 on the CPU, in the data's scale."""
    n = plan.n if n is None else n
    seed = plan.seed if seed is None else seed
    if n < 1:
        raise OptionError("n", f"{OPTION} (the number of samples) must be at least 1, got {n}")
    if batch_size < 1:
        raise OptionError("batch_size", f"{OPTION} must be at least 1, got {batch_size}")
    if plan.cond is None:
        x = generate(plan.model, run.schedule, run.shape, n, sampler=plan.sampler, steps=plan.steps,
                     prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, batch_size=batch_size, seed=seed,
                     device=run.device, labels=plan.labels, progress=progress, callback=callback, **plan.options)
    else:
        x = _draw_conditioned(run, plan, n, seed, batch_size, progress, callback)
    if run.codec is not None:  # latent diffusion: x_0 is a latent; the decoder gives the pixels
        x = decode(run, x, batch_size)
    return x


def batch_model(run: Run, plan: SamplingPlan, rows: slice):
    """The network of samples ``rows`` of a conditioned plan: their rows of plan.cond bound to it, guided as
    planned (a text run's from its unconditional prompt; else by classes, samplers.guidance.conditioning)."""
    cond = plan.cond[rows].to(run.device)
    if plan.uncond is not None:
        return TextGuidance(run.model, cond, plan.uncond[rows].to(run.device), plan.guidance)
    net = bind_condition(run.model, cond)
    return net if plan.guidance is None or run.is_text else guided(net, scale=plan.guidance)


def _draw_conditioned(run: Run, plan: SamplingPlan, n: int, seed: int, batch_size: int, progress: bool,
                      callback) -> torch.Tensor:
    """draw_samples of an image-conditioned or text run: batch b (noise seed + b, as generate's batches)
    binds its own rows of the plan's conditioning to the network (:func:`batch_model`)."""
    if len(plan.cond) != n:
        raise ConfigError(f"the plan was made for {len(plan.cond)} samples (its conditioning), not {n}")
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        rows = slice(start, min(start + batch_size, n))
        net = batch_model(run, plan, rows)
        labels = None if plan.labels is None else plan.labels[rows]
        out.append(generate(net, run.schedule, run.shape, rows.stop - start, sampler=plan.sampler, steps=plan.steps,
                            prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, batch_size=batch_size,
                            seed=seed + b, device=run.device, labels=labels, progress=progress, callback=callback,
                            **plan.options))
    return torch.cat(out)


def decode(run: Run, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A latent run's samples as pixels (decoded in batches on the run's device), on the CPU."""
    return torch.cat([run.codec.decode(b.to(run.device)).cpu() for b in z.split(batch_size)])
