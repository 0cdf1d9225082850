"""Editing a given picture with a run: SDEdit (img2img) and RePaint (inpainting), one flow for every front end.

* img2img (Meng et al. 2022): :func:`plan_img2img` turns a :class:`SamplingRequest` and a
  strength into a plan that starts at t0 = strength * T; :func:`edit_img2img` draws it.
* inpainting (Lugmayr et al. 2022): :func:`plan_inpainting` checks an :class:`InpaintRequest`
  against the run; :func:`draw_inpainting` fills the mask.

A given picture keeps its own class: the run's guidance applies only where a class is asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ddpmlab.diffusion.reverse import check_variance
from ddpmlab.errors import ConfigError, about
from ddpmlab.runs.draw import decode
from ddpmlab.runs.load import Run
from ddpmlab.runs.request import (
    Label,
    SamplingPlan,
    SamplingRequest,
    check_steps,
    condition_tag,
    guide,
    plan_request,
    run_guidance,
)
from ddpmlab.samplers.editing import img2img, inpaint, strength_to_steps
from ddpmlab.samplers.registry import get_spec


def plan_img2img(run: Run, request: SamplingRequest, strength: float,
                 log: Callable[[str], None] = print) -> Tuple[SamplingPlan, int]:
    """(plan, t0) of SDEdit at ``strength``: the picture is noised to t0 = strength * T (at least 1)."""
    with about("strength"):
        t0 = strength_to_steps(strength, run.T)
    return plan_request(run, dataclasses.replace(request, img2img_t0=max(t0, 1)), log), t0


def edit_img2img(run: Run, plan: SamplingPlan, image: torch.Tensor, strength: float, n: Optional[int] = None, *,
                 seed: Optional[int] = None, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """SDEdit variations of ``image`` (C, H, W, pixels) as planned (n and seed: the plan's by default):
    (n, C, H, W) pixels on the CPU; a latent run noises and denoises the image's latents and decodes them."""
    n, seed = plan.n if n is None else n, plan.seed if seed is None else seed
    start = run.codec.encode(image[None].to(run.device))[0].cpu() if run.is_latent else image
    x = img2img(plan.model, run.schedule, start, strength, n, sampler=plan.sampler, steps=plan.steps,
                prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, labels=plan.labels, seed=seed,
                batch_size=batch_size, device=run.device, progress=progress, **plan.options)
    return decode(run, x, batch_size) if run.is_latent else x


@dataclass(frozen=True)
class InpaintRequest:
    """RePaint fillings of a masked picture (Lugmayr et al. 2022), by name; None is as the run says.

    steps: respaced diffusion steps (250 as the paper); step_schedule: which timesteps they use
    (uniform, leading or trailing); variance: the reverse variance (None: the run's
    diffusion.variance); jump_length / jump_n_sample: the resampling jumps (1: none); label: a
    class (name or index); guidance: None -> the run's train.sample_guidance where a class is
    asked for (without one the fill keeps the picture's own class).
    """

    steps: int = 250
    step_schedule: Optional[str] = None
    variance: Optional[str] = None
    jump_length: int = 10
    jump_n_sample: int = 10
    label: Label = None
    guidance: Optional[float] = None
    seed: int = 0
    n: int = 4


@dataclass
class InpaintPlan:
    """What one RePaint call needs: the (guided) model, labels, and the options of samplers.editing.inpaint."""

    model: nn.Module
    labels: Optional[torch.Tensor]
    label: Optional[int]
    guidance: Optional[float]
    options: dict
    n: int

    def condition_tag(self) -> str:
        return condition_tag(self.label, self.guidance)


def plan_inpainting(run: Run, request: InpaintRequest, log: Callable[[str], None] = print) -> InpaintPlan:
    """The RePaint call ``request`` asks for on ``run``: steps within T, the step schedule ddpm takes,
    the run's variance, the class and, where a class is asked for, the run's guidance."""
    if run.is_text:
        raise ConfigError(f"{run.dir or 'this run'} is a text-to-image run: inpainting does not take prompts yet; "
                          f"redraw a picture with a prompt by img2img: ddpm img2img {run.dir or 'RUN'} --image "
                          "IMAGE --prompt \"...\"")
    get_spec("ddpm").check_step_schedule(request.step_schedule)  # RePaint steps as ddpm does
    check_steps(request.steps, run.T)
    variance = check_variance(request.variance or run.cfg.diffusion.variance)
    label = run.class_index(request.label)
    guidance = request.guidance if label is None else run_guidance(run, request.guidance, log)
    model, labels = guide(run, run.model, request.n, label, guidance)
    options = dict(steps=request.steps, jump_length=request.jump_length, jump_n_sample=request.jump_n_sample,
                   variance=variance, spacing=request.step_schedule or "uniform", seed=request.seed)
    return InpaintPlan(model, labels, label, guidance, options, request.n)


def draw_inpainting(run: Run, plan: InpaintPlan, image: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 64,
                    progress: bool = True) -> torch.Tensor:
    """The fillings ``plan`` says of the white region of ``mask`` (1, H, W) in ``image`` (C, H, W):
    (n, C, H, W) pixels on the CPU."""
    return edit_inpaint(run, plan.model, image, mask, plan.n, labels=plan.labels, batch_size=batch_size,
                        progress=progress, **plan.options)


def edit_inpaint(run: Run, model, image: torch.Tensor, mask: torch.Tensor, n: int, *,
                 labels: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
    """RePaint fillings of the white region of ``mask`` (1, H, W) in ``image`` (C, H, W, pixels) by ``run``'s
    denoiser ``model``: (n, C, H, W) pixels on the CPU; ``options`` go to
    :func:`~ddpmlab.samplers.editing.inpaint`.  A latent run fills the image's latents where the mask,
    max-pooled to the latent resolution (a latent is redrawn where any of its pixels is), is set,
    decodes them, and keeps the image's own pixels outside the mask."""
    kw = dict(prediction=run.cfg.diffusion.prediction, clip_x0=run.clip_x0, labels=labels, device=run.device)
    if not run.is_latent:
        return inpaint(model, run.schedule, image, mask, n, **kw, **options)
    z = run.codec.encode(image[None].to(run.device))[0].cpu()
    z_mask = (F.adaptive_max_pool2d(mask[None].float(), z.shape[1:])[0] > 0.5).float()
    x = decode(run, inpaint(model, run.schedule, z, z_mask, n, **kw, **options), options.get("batch_size", 64))
    return torch.where(mask[None] > 0.5, x, image[None])
