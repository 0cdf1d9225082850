"""A flow run in a diffusers folder: what a diffusers user needs to sample it, written beside the weights.

diffusers' ``FlowMatchEulerDiscreteScheduler`` (:func:`~ddpmlab.io.diffusers_schedule.flow_scheduler_config`)
takes Euler steps x <- x + (sigma_next - sigma) v of the flow ODE with the network's velocity v at timestep
sigma * T: ddpmlab's ``flow_euler`` (:mod:`ddpmlab.samplers.flow`).  diffusers has no pipeline for a flow UNet
without text, but ``DDPMPipeline``'s loop (noise, ``set_timesteps(N)``, ``unet(x, t)``, ``scheduler.step``)
is exactly that Euler loop when its scheduler is this one, so a UNet flow run is written as a
``DDPMPipeline`` folder (unconditional models sample with ``pipe(...)``).  Where that call is not ddpmlab's
sampler (class labels and guidance, a DiT, a diffusion.flow_shift other than 1: ``set_timesteps(N)`` shifts the
grid's lowest sigma twice) ``OUT/README.md`` holds the loop that is (:func:`flow_loop`); the tests run the
loop from that file against ``flow_euler``.
"""

from __future__ import annotations

from pathlib import Path

from ddpmlab.config import Config
from ddpmlab.data import data_shape

# the network of each exported part: (diffusers class, subfolder)
_PARTS = {"unet": ("UNet2DModel", "unet"), "transformer": ("DiTTransformer2DModel", "transformer")}

_LOOP = '''import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, {cls}


@torch.no_grad()
def sample(folder, n=4, steps=50, seed=0, labels=None, guidance=1.0, clip=True):
    """n images (n, {shape}) in [0, 1]: Euler steps of the flow ODE dx/dt = v from t = 1 (noise) to t = 0,
    as ddpmlab's flow_euler.  labels: n class indices ({labels_doc}); guidance: the classifier-free guidance
    scale (1: conditional); clip: the x0 estimate x - t v clamped to [-1, 1] at every step, as ddpm sample does."""
    net = {cls}.from_pretrained(folder, subfolder="{sub}").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    T = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / T, steps))  # uniform in t; the scheduler shifts it once
    x = torch.randn((n, {shape}), generator=torch.Generator().manual_seed(seed))  # pure noise at t = 1
    null = {null}  # {null_doc}
    y = null if labels is None else torch.as_tensor(labels).long().reshape(-1).expand(n)
    for i, timestep in enumerate(scheduler.timesteps):
        t, tt = scheduler.sigmas[i], timestep.expand(n)  # the flow time t; the network sees t * T
        v = net(x, tt, class_labels=y).sample  # the velocity eps - x_0
        if guidance != 1.0:  # Ho & Salimans 2022, Eq. 6: uncond + scale * (cond - uncond)
            v_null = net(x, tt, class_labels=null).sample
            v = v_null + guidance * (v - v_null)
        if clip:  # x_0 = x - t v clamped, eps = (x - (1 - t) x_0) / t: v = eps - x_0 = (x - x_0) / t
            v = (x - (x - t * v).clamp(-1.0, 1.0)) / t
        x = scheduler.step(v, timestep, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)
'''


def flow_loop(cfg: Config, part: str) -> str:
    """The Python source of ``sample(folder, n, steps, seed, labels, guidance, clip)`` for a flow run exported with
    its network in subfolder ``part`` (``unet`` or ``transformer``)."""
    cls, sub = _PARTS[part]
    k = int(cfg.model.num_classes or 0)
    if k:
        null, null_doc, labels_doc = f"torch.full((n,), {k})", f"class {k}: 'no label'", f"0..{k - 1}"
    elif part == "transformer":  # an unconditional DiT exports with one class of zero embedding
        null, null_doc, labels_doc = "torch.zeros(n, dtype=torch.long)", "the one class of an unconditional DiT", "0"
    else:
        null, null_doc, labels_doc = "None", "an unconditional UNet takes no labels", "none"
    return _LOOP.format(cls=cls, sub=sub, shape=", ".join(map(str, data_shape(cfg))), null=null,
                        null_doc=null_doc, labels_doc=labels_doc)


def write_flow_card(cfg: Config, out: Path, part: str) -> Path:
    """``out/README.md``: how diffusers loads and samples the exported flow run (the loop of :func:`flow_loop`)."""
    d, k = cfg.diffusion, int(cfg.model.num_classes or 0)
    if part == "unet":
        load = ("`diffusers.DDPMPipeline.from_pretrained(OUT)` loads the UNet2DModel and the scheduler"
                + ("; `pipe(batch_size=n, num_inference_steps=N)` is this loop with clip=False"
                   if not k and d.flow_shift == 1 else
                   " (its call is not this loop: " + ("it passes no class labels" if k else
                                                      "`set_timesteps(N)` shifts the lowest sigma twice") + ")"))
    else:
        load = ("`DiTTransformer2DModel.from_pretrained(OUT, subfolder=\"transformer\")` and "
                "`FlowMatchEulerDiscreteScheduler.from_pretrained(OUT, subfolder=\"scheduler\")` load the parts "
                "(diffusers' DiTPipeline needs a VAE)")
    text = (f"# A ddpmlab flow-matching run for diffusers\n\n"
            f"- Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): x_t = (1 - t) x_0 + t eps, "
            f"t = 1 pure noise; the network predicts the velocity eps - x_0 at timestep t * {d.num_timesteps}.\n"
            f"- Scheduler: `FlowMatchEulerDiscreteScheduler` (num_train_timesteps {d.num_timesteps}, shift "
            f"{float(d.flow_shift):g}: the run's diffusion.flow_shift).\n- {load}.\n"
            f"- diffusers has no stock pipeline for a flow UNet or DiT with class labels; the loop below, with the "
            f"same seed, labels and guidance, draws the samples of ddpmlab's `flow_euler` (`ddpm sample RUN "
            f"--sampler flow_euler --steps N --seed S`; clip=False: without its clamp of x0) to float32 "
            f"precision.\n- `ddpmlab_config.yaml`: the run's config.\n\n"
            f"```python\n{flow_loop(cfg, part)}```\n\n"
            f"```python\nimages = sample(\"OUT\", n=8, steps=50)  # OUT: this folder\n```\n")
    path = Path(out) / "README.md"
    path.write_text(text)
    return path
