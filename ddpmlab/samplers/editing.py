"""Image editing with an unconditional denoiser: RePaint inpainting and SDEdit image-to-image.

* :func:`repaint` (Lugmayr et al. 2022, Algorithm 1 with resampling jumps): the region to
  keep is drawn from the forward process q(x_{t-1} | x_0) of the input, the hole from the
  model's ancestral step; jumping back up the chain now and then (re-noising with
  q(x_t | x_{t-1})) lets the two parts harmonise.
* :func:`sdedit` (Meng et al. 2022): noise an input to level t0 = strength * T with
  q(x_t0 | x_0), then run any sampler from t0 down to 0.

Masks are 1 (white) where the image is to be filled and 0 where it is kept.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ddpmlab.diffusion.process import extract, q_sample
from ddpmlab.diffusion.reverse import ancestral_step, check_variance
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.progress import SampleBar
from ddpmlab.samplers.ancestral import predict_step, respaced
from ddpmlab.samplers.base import Callback, ModelPredictor, randn_like
from ddpmlab.samplers.registry import get_sampler


def repaint_times(n: int, jump_length: int = 10, jump_n_sample: int = 10) -> List[int]:
    """The schedule entries RePaint visits, from n-1 (x_T) down to -1 (x_0).

    Every ``jump_length``-th entry below n - jump_length is a jump point: on reaching it the
    chain goes back up ``jump_length`` entries, ``jump_n_sample - 1`` times in all, so each
    stretch between jump points is denoised ``jump_n_sample`` times (Lugmayr et al. 2022,
    Sec. 4.2).  Consecutive entries differ by exactly 1: -1 a denoising step, +1 a re-noising.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ConfigError(f"RePaint needs jump_length >= 1 and jump_n_sample >= 1, got {jump_length} and {jump_n_sample}")
    jumps_left = {i: jump_n_sample - 1 for i in range(0, n - jump_length, jump_length)}
    i, times = n - 1, [n - 1]
    while i >= 0:
        i -= 1
        times.append(i)
        if jumps_left.get(i, 0) > 0:
            jumps_left[i] -= 1
            for _ in range(jump_length):
                i += 1
                times.append(i)
    return times


def repaint_nfe(n: int, jump_length: int = 10, jump_n_sample: int = 10) -> int:
    """Number of network evaluations (denoising steps) of :func:`repaint` on n schedule entries, counted
    without building :func:`repaint_times` (so a huge request is measured before anything is allocated):
    n steps down, and at each jump point J = jump_length more, jump_n_sample - 1 times."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ConfigError(f"RePaint needs jump_length >= 1 and jump_n_sample >= 1, got {jump_length} and "
                          f"{jump_n_sample}")
    jump_points = len(range(0, n - jump_length, jump_length))  # those of repaint_times; len() builds nothing
    return n + jump_points * (jump_n_sample - 1) * jump_length


@torch.no_grad()
def repaint(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: Optional[int] = None, *,
            x0_known: torch.Tensor, mask: torch.Tensor, generator: Optional[torch.Generator] = None,
            callback: Callback = None, jump_length: int = 10, jump_n_sample: int = 10,
            variance: str = "fixed_large", spacing: str = "uniform") -> torch.Tensor:
    """Fill the region ``mask == 1`` of ``x0_known`` (B, ...) starting from noise x_T (B, ...).

    ``mask`` broadcasts against x_T (e.g. (1, 1, H, W) for images) and is 1 where to fill,
    0 where to keep.  With steps < T the schedule is respaced as in :func:`ddpm`.  The kept
    region of the result equals ``x0_known`` exactly (the last step draws it from
    q(x_0 | x_0)).  ``jump_length=1, jump_n_sample=U`` is Algorithm 1 with U resamplings.
    """
    variance = check_variance(variance)
    s = respaced(schedule, steps, spacing)
    keep = 1.0 - mask.to(x_T.dtype)
    x0_known = x0_known.to(x_T.dtype)
    x, k = x_T, 0
    times = repaint_times(s.num_timesteps, jump_length, jump_n_sample)
    for i, j in zip(times[:-1], times[1:]):
        idx = torch.full((x.shape[0],), max(i, j), dtype=torch.long)
        if j > i:
            # re-noise one step, q(x_j | x_{j-1}) = N(sqrt(1 - beta_j) x_{j-1}, beta_j I) (Alg. 1, line 10)
            beta = extract(s.betas, idx, x)
            x = (1.0 - beta).sqrt() * x + beta.sqrt() * randn_like(x, generator)
            continue
        # known part: x_{t-1} ~ q(x_{t-1} | x_0) of the input (Alg. 1, line 5); x_0 itself at the end
        abar_prev = extract(s.alphas_cumprod_prev, idx, x)
        known = x0_known if i == 0 else abar_prev.sqrt() * x0_known + (1 - abar_prev).sqrt() * randn_like(x, generator)
        # unknown part: one ancestral step of the model (Alg. 1, line 7; Ho et al. 2020, Eq. 7)
        eps, x0, log_var = predict_step(predict, s, x, i, variance)
        unknown = ancestral_step(s, x, i, x0, variance, log_var, randn_like(x, generator) if i > 0 else None)
        x = keep * known + (1.0 - keep) * unknown  # Alg. 1, line 8
        if callback is not None:
            callback(k, x, x0)
        k += 1
    return x


def strength_to_steps(strength: float, T: int) -> int:
    """The number n0 = round(strength * T) of forward steps SDEdit noises an input with."""
    if not 0.0 <= strength <= 1.0:
        raise DDPMError(f"strength must be in [0, 1] (0: return the input, 1: ignore it), got {strength}")
    return int(round(strength * T))


@torch.no_grad()
def sdedit(sampler: Callable, predict, schedule: NoiseSchedule, x_input: torch.Tensor, strength: float,
           steps: Optional[int] = None, *, generator: Optional[torch.Generator] = None,
           callback: Callback = None, **options) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): x_input (B, ...) noised to t0 and denoised by ``sampler``.

    t0 is entry n0 - 1 with n0 = round(strength * T): x_t0 = sqrt(abar_t0) x + sqrt(1 - abar_t0) eps
    (Ho et al. 2020, Eq. 4).  The sampler then runs on the schedule cut at t0 (its first
    n0 entries, unchanged), with ``steps`` steps (at most n0; None: n0).  strength 0 returns
    the input; strength 1 starts from pure noise, exactly like the plain sampler.
    """
    n0 = strength_to_steps(strength, schedule.num_timesteps)
    if n0 == 0:
        return x_input.clone()
    noise = randn_like(x_input, generator)
    if n0 == schedule.num_timesteps:
        x_t0, cut = noise, schedule  # strength 1: the sampler's own prior N(0, I)
    else:
        x_t0 = q_sample(schedule, x_input, torch.tensor(n0 - 1), noise)
        cut = NoiseSchedule.from_betas(schedule.betas[:n0], timesteps=schedule.timesteps[:n0])
    steps = n0 if steps is None else min(int(steps), n0)
    return sampler(predict, cut, x_t0, steps, generator=generator, callback=callback, **options)


def _batches(n: int, batch_size: int):
    for b, start in enumerate(range(0, n, batch_size)):
        yield b, start, min(batch_size, n - start)


@torch.no_grad()
def inpaint(model, schedule: NoiseSchedule, image: torch.Tensor, mask: torch.Tensor, n: int = 4, *,
            prediction: str = "eps", clip_x0: Optional[float] = 1.0, labels: Optional[torch.Tensor] = None,
            steps: Optional[int] = 250, jump_length: int = 10, jump_n_sample: int = 10, variance: str = "fixed_large",
            spacing: str = "uniform", seed: int = 0, batch_size: int = 64, device=None,
            progress: bool = True) -> torch.Tensor:
    """``n`` fillings of the white region of ``mask`` (1, H, W) in ``image`` (C, H, W): (n, C, H, W) on the CPU.

    RePaint with ``steps`` respaced steps and resampling jumps; batch b starts from seed + b.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nfe = repaint_nfe(steps or schedule.num_timesteps, jump_length, jump_n_sample)
    bar = SampleBar(progress, n, nfe, f"inpainting (RePaint, {nfe} steps)")
    out = []
    try:
        for b, start, m in _batches(n, batch_size):
            bar.start_batch(m)
            gen = torch.Generator(device="cpu").manual_seed(seed + b)
            x_T = torch.randn((m, *image.shape), generator=gen).to(device)
            y = None if labels is None else labels[start:start + m].to(device)
            predict = ModelPredictor(model, schedule, prediction, y=y, clip_x0=clip_x0)
            x = repaint(predict, schedule, x_T, steps, x0_known=image.to(device).expand(m, *image.shape),
                        mask=mask.to(device)[None], generator=gen, callback=bar.step,
                        jump_length=jump_length, jump_n_sample=jump_n_sample, variance=variance, spacing=spacing)
            out.append(x.float().cpu())
    finally:
        bar.close()
    return torch.cat(out)


@torch.no_grad()
def img2img(model, schedule: NoiseSchedule, image: torch.Tensor, strength: float, n: int = 4, *,
            sampler: str = "ddim", steps: Optional[int] = 50, prediction: str = "eps",
            clip_x0: Optional[float] = 1.0, labels: Optional[torch.Tensor] = None, seed: int = 0,
            batch_size: int = 64, device=None, progress: bool = True, **options) -> torch.Tensor:
    """``n`` SDEdit variations of ``image`` (C, H, W) at ``strength``: (n, C, H, W) on the CPU.

    ``steps``: sampler steps from t0 = strength * T down to 0 (at most the n0 timesteps there).
    """
    fn = get_sampler(sampler)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n0 = strength_to_steps(strength, schedule.num_timesteps)
    total = 0 if n0 == 0 else (n0 if steps is None else min(steps, n0))
    bar = SampleBar(progress and total > 0, n, total, f"img2img ({sampler}, {total} steps)")
    out = []
    try:
        for b, start, m in _batches(n, batch_size):
            bar.start_batch(m)
            gen = torch.Generator(device="cpu").manual_seed(seed + b)
            y = None if labels is None else labels[start:start + m].to(device)
            predict = ModelPredictor(model, schedule, prediction, y=y, clip_x0=clip_x0)
            x_in = image.to(device).expand(m, *image.shape).clone()
            x = sdedit(fn, predict, schedule, x_in, strength, steps, generator=gen,
                       callback=bar.step, **options)
            out.append(x.float().cpu())
    finally:
        bar.close()
    return torch.cat(out)
