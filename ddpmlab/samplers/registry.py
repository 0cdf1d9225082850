"""Samplers by name."""

from __future__ import annotations

import difflib
from typing import Callable, Dict

from ddpmlab.errors import ConfigError
from ddpmlab.samplers.ancestral import ddim, ddpm
from ddpmlab.samplers.langevin import pc
from ddpmlab.samplers.solvers import dpmpp_2m, dpmpp_3m, euler, heun, unipc

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

