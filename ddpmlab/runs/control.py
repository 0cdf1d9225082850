"""ControlNets on a run: a ControlNet run loaded, checked against the base it is put on, with its control picture.

:func:`with_controlnets` is what ``ddpm sample RUN --controlnet CN --control picture.png [--control-scale S]``
does: the run's UNet steered by each ControlNet (:class:`~ddpmlab.models.controlnet.ControlledUNet`), which every
sampler then calls like any denoiser.
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
from ddpmlab.models.controlnet import ControlledUNet, ControlNet, build_controlnet, check_fits
from ddpmlab.models.unet import UNet
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
    name = f"'{run.dir or run.checkpoint}'"
    if not isinstance(run.model, UNet):
        raise DDPMError(f"--controlnet steers a plain UNet; {name} is a {type(run.model).__name__} (model.kind "
                        f"{run.cfg.model.kind})")
    items = []
    for path, picture, scale in zip(controlnets, controls, control_scales(scales, len(controlnets))):
        cfg, net = load_controlnet(path, "ema", run.device)
        check_fits(net, run.model, f"'{path}'", name)
        if run.dir is not None and Path(cfg.controlnet.base).resolve() != Path(run.dir).resolve():
            say(f"note: ControlNet '{path}' was trained on {cfg.controlnet.base}; it is used on {name}")
        image = read_control(picture, net.control_shape(run.shape), say)
        items.append((net, image.to(run.device, torch.float32), scale))
    return dataclasses.replace(run, model=ControlledUNet(run.model, items))
