"""Samplers by name.  ``SAMPLERS["ddim"](predict, schedule, x_T, steps, **options)``.

The registry is the one list the CLI, the benchmarks and the tests use.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict

from ..errors import ConfigError
from .ancestral import ddim, ddpm
from .base import ModelPredictor, randn_like
from .langevin import pc
from .solvers import dpmpp_2m, dpmpp_3m, euler, heun, unipc
from .steps import STEP_SCHEDULES

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


__all__ = ["SAMPLERS", "get_sampler", "ModelPredictor", "randn_like", "ddpm", "ddim", "STEP_SCHEDULES",
           "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun", "pc"]
