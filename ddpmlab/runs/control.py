"""ControlNets on a run: a ControlNet run loaded, checked against the base it is put on, with its control picture.

:func:`with_controlnets` is what ``ddpm sample RUN --controlnet CN --control picture.png [--control-scale S]``
does: the run's UNet steered by each ControlNet (:class:`~ddpmlab.models.controlnet.ControlledUNet`), which every
sampler then calls like any denoiser.  A text run keeps taking prompts (``--prompt``): the prompts are encoded
once and read by the base and each ControlNet.  A latent run's control is a picture of its images' size.
:func:`controlnet_for` and :func:`steer` are its two halves, for a front end that keeps ControlNets loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch

from ddpmlab.config import Config
from ddpmlab.data.control import read_control
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import CONFIG_FILE, load_run_config, newest_weights, require_run_dir
from ddpmlab.models.controlnet import ControlledUNet, ControlNet, base_unet, build_controlnet, check_fits
from ddpmlab.runs.load import Run


def load_controlnet(run_dir, which: str = "ema", device="cpu") -> Tuple[Config, ControlNet]:
    """(config, ControlNet in eval mode) of a ``ddpm train-controlnet`` run, with its ``which`` weights."""
    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    if not cfg.controlnet.base:
        raise DDPMError(f"'{run_dir}' is not a ControlNet run (no controlnet.base in its {CONFIG_FILE}); make one with "
                        "`ddpm train-controlnet BASE`")
    net = build_controlnet(cfg)
    net.load_state_dict(newest_weights(run_dir, which)[1])
    return cfg, net.to(device).eval()


def control_scales(scales: Sequence[float], count: int) -> List[float]:
    """One scale per ControlNet: each given, one for all, or 1 when none is given."""
    if not scales:
        return [1.0] * count
    if len(scales) == 1:
        return [float(scales[0])] * count
    if len(scales) != count:
        raise DDPMError(f"{len(scales)} --control-scale values for {count} ControlNets; give one for all or one each")
    return [float(s) for s in scales]


def controlnet_for(run: Run, path, which: str = "ema", say: Callable[[str], None] = print) -> ControlNet:
    """The ControlNet run ``path`` (its ``which`` weights) on ``run``'s device, checked to fit ``run``'s UNet (one
    line naming the first tensor that differs); a note through ``say`` when it was trained on another run."""
    name = f"'{run.dir or run.checkpoint}'"
    unet = base_unet(run.model)
    if unet is None:
        raise DDPMError(f"--controlnet steers a UNet; {name} is a {type(run.model).__name__} (model.kind "
                        f"{run.cfg.model.kind})")
    cfg, net = load_controlnet(path, which, run.device)
    check_fits(net, unet, f"'{path}'", name)
    if run.dir is not None and Path(cfg.controlnet.base).resolve() != Path(run.dir).resolve():
        say(f"note: ControlNet '{path}' was trained on {cfg.controlnet.base}; it is used on {name}")
    return net


def steer(run: Run, items: Sequence[Tuple[ControlNet, torch.Tensor, float]]) -> Run:
    """``run`` with its UNet steered by (ControlNet, control (1, C, H, W) in [0, 1], scale) each."""
    items = [(net, image.to(run.device, torch.float32), float(scale)) for net, image, scale in items]
    return dataclasses.replace(run, model=ControlledUNet(run.model, items))


def with_controlnets(run: Run, controlnets: Sequence, controls: Sequence, scales: Sequence[float] = (),
                     say: Callable[[str], None] = print) -> Run:
    """``run`` with its UNet steered by ControlNet runs ``controlnets``, ControlNet i by the picture ``controls[i]``
    (scaled and center-cropped to its size, with a note, if it has another) times ``scales[i]``; the run itself
    without any.  A ControlNet of another base is refused naming the first tensor that differs."""
    if not controlnets:
        if controls:
            raise DDPMError("--control gives a ControlNet's control picture, but no --controlnet is given; add "
                            "--controlnet CN_RUN (a run of ddpm train-controlnet) for each --control")
        return run
    if len(controls) != len(controlnets):
        raise DDPMError(f"give one --control picture per --controlnet (got {len(controlnets)} --controlnet and "
                        f"{len(controls)} --control)")
    items = []
    for path, picture, scale in zip(controlnets, controls, control_scales(scales, len(controlnets))):
        net = controlnet_for(run, path, "ema", say)
        items.append((net, read_control(picture, net.control_shape(run.shape), say), scale))
    return steer(run, items)
