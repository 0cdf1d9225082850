"""Samplers by name."""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Optional, Sequence

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.ancestral import ddim, ddpm
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.langevin import pc
from ddpmlab.samplers.solvers import dpmpp_2m, dpmpp_3m, euler, heun, unipc
from ddpmlab.samplers.steps import STEP_SCHEDULES, optimize_timesteps

SAMPLERS: Dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "euler": euler,
    "heun": heun,
    "pc": pc,
}



def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        close = difflib.get_close_matches(name, list(SAMPLERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown sampler '{name}'{hint} (available: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


INTEGER_SPACINGS = ("uniform", "leading", "trailing")  # what ddpm / ddim (ancestral.py) take as `spacing`


def check_timesteps_name(sampler: str, name: Optional[str], where: str = "--timesteps") -> None:
    """Fail fast on a step schedule the sampler cannot use (``where`` names the option in the message)."""
    if name is None:
        return
    if name not in STEP_SCHEDULES:
        close = difflib.get_close_matches(name, list(STEP_SCHEDULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown schedule '{name}'{hint} (available: {', '.join(STEP_SCHEDULES)})")
    if sampler == "pc" and name == "optimized":
        raise ConfigError(f"{where}: 'optimized' is fitted to deterministic solvers; pc takes the other schedules")
    if sampler in ("ddpm", "ddim") and name not in INTEGER_SPACINGS:
        raise ConfigError(f"{where}: {sampler} takes {', '.join(INTEGER_SPACINGS)}, not '{name}'; for other step "
                          "schedules use euler (DDIM on any schedule) or a higher-order solver")


def timesteps_options(sampler: str, name: Optional[str], model, schedule: NoiseSchedule, shape: Sequence[int],
                      steps: int, *, prediction: str = "eps", clip_x0: Optional[float] = None, device="cpu",
                      y: Optional[torch.Tensor] = None, seed: int = 0, calibration: int = 256,
                      log: Callable[[str], None] = print) -> dict:
    """The sampler option for step schedule ``name``: {"spacing": ...} for ddpm/ddim, {"timesteps": ...}
    for the solvers; ``optimized`` is computed here on ``calibration`` noise samples drawn with
    seed + 20000 (never the sampling noise).  x shapes: (B, *shape)."""
    check_timesteps_name(sampler, name)
    if name is None:
        return {}
    if sampler in ("ddpm", "ddim"):
        return {"spacing": name}
    if name != "optimized":
        return {"timesteps": name}

    calibration = calibration if y is None else min(calibration, len(y))
    x_cal = torch.randn((calibration, *shape), generator=torch.Generator().manual_seed(seed + 20_000)).to(device)
    predict = ModelPredictor(model, schedule, prediction, y=None if y is None else y[:calibration].to(device),
                             clip_x0=clip_x0)
    log(f"optimising the {steps}-NFE step schedule of {sampler} on {calibration} calibration samples ...")
    ts = optimize_timesteps(predict, schedule, SAMPLERS[sampler], steps, x_cal)
    log("timesteps: " + ", ".join(f"{t:.1f}" for t in ts.tolist()))
    return {"timesteps": ts}
