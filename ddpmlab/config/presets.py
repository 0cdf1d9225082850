"""A section's named preset (dit.preset, diffwave.preset): its values, checked against the keys the config
also gives."""

from __future__ import annotations

import difflib
from typing import Mapping

from ddpmlab.errors import ConfigError


def preset_values(section: str, d, presets: Mapping[str, Mapping], source: str, what: str) -> dict:
    """``d.preset``'s values in ``presets`` (``section``: the config section's name, e.g. "dit"; ``what``: the
    model it sizes, e.g. "the DiT"); an unknown name (with the closest one, case aside) or a key of ``d`` that
    contradicts the preset: a one-line ConfigError."""
    if d.preset not in presets:
        lower = {name.lower(): name for name in presets}
        close = difflib.get_close_matches(str(d.preset).lower(), list(lower), n=1, cutoff=0.5)
        hint = f"did you mean '{lower[close[0]]}'? " if close else ""
        raise ConfigError(f"{source}: unknown {section}.preset {d.preset!r}; {hint}choose one of "
                          f"{', '.join(presets)}")
    preset = presets[d.preset]
    clash = [f"{section}.{k}={getattr(d, k)}" for k, v in preset.items() if getattr(d, k) not in (None, v)]
    if clash:
        sets = ", ".join(f"{section}.{k}={v}" for k, v in preset.items())
        raise ConfigError(f"{source}: {section}.preset={d.preset} sets {sets}, but the config also gives "
                          f"{', '.join(clash)}; drop {section}.preset to size {what} by hand, or drop those keys")
    return dict(preset)
