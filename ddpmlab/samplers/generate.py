"""Draw many samples from a trained denoiser: batching, seeding and a progress bar."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.progress import SampleBar
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.registry import get_sampler
from ddpmlab.samplers.steps import levels_for


@torch.no_grad()
def generate(model, schedule: NoiseSchedule, shape: Sequence[int], n: int, *, sampler: str = "ddim",
             steps: Optional[int] = None, prediction: str = "eps", clip_x0: Optional[float] = 1.0,
             batch_size: int = 256, seed: int = 0, device=None, labels: Optional[torch.Tensor] = None,
             progress: bool = True, callback=None, **options) -> torch.Tensor:
    """``n`` samples of ``shape`` (per sample, e.g. (1, 28, 28)) on the CPU: (n, *shape).

    Batch b starts from noise drawn with seed ``seed + b``, so a given seed gives the same
    samples whatever else runs; memory stays bounded by ``batch_size``.
    """
    fn = get_sampler(sampler)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    steps = schedule.num_timesteps if steps is None else steps
    was_training = model.training
    model.eval()
    out = []
    n_batches = (n + batch_size - 1) // batch_size
    levels = levels_for(fn, steps, **options)  # callbacks per batch: one per noise level (Heun, pc: < steps)
    bar = SampleBar(progress, n, levels, f"sampling ({sampler}, {steps} steps)")
    try:
        for b in range(n_batches):
            m = min(batch_size, n - b * batch_size)
            bar.start_batch(m)
            gen = torch.Generator(device="cpu").manual_seed(seed + b)
            x_T = torch.randn((m, *shape), generator=gen).to(device)
            y = None if labels is None else labels[b * batch_size: b * batch_size + m].to(device)
            predict = ModelPredictor(model, schedule, prediction, y=y, clip_x0=clip_x0)

            def cb(k, x, x0):
                bar.step()
                if callback is not None:
                    callback(k, x, x0)

            out.append(fn(predict, schedule, x_T, steps, generator=gen, callback=cb, **options).float().cpu())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)
