"""The ControlNet keys of a config (controlnet.*; ``ddpm train-controlnet``): their checks, each error naming the key.

Never changes the config.  Whether the base is a UNet run and the control pictures exist is checked where the base
and the data are read (:mod:`ddpmlab.training.tasks.controlnet`).
"""

from __future__ import annotations

from ddpmlab.config.sections import CONTROL_DETECTORS, Config
from ddpmlab.errors import ConfigError


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_controlnet(cfg: Config, source: str) -> None:
    """Check the controlnet section: the detector, its thresholds, the label dropout and the widths."""
    c = cfg.controlnet
    if c.detector is not None and c.detector not in CONTROL_DETECTORS:
        raise ConfigError(f"{source}: 'controlnet.detector' is {c.detector!r}; choose one of "
                          f"{', '.join(CONTROL_DETECTORS)}, or null for control pictures in a folder")
    if c.base is not None and not str(c.base).strip():
        raise ConfigError(f"{source}: 'controlnet.base' is empty; give the base run's folder, or null")
    for key in ("edge_threshold", "mask_threshold"):
        if not 0.0 <= getattr(c, key) <= 1.0:
            raise ConfigError(f"{source}: 'controlnet.{key}' must be in [0, 1] (images are read in [0, 1]), "
                              f"got {getattr(c, key)}")
    if not c.blur_sigma > 0:
        raise ConfigError(f"{source}: 'controlnet.blur_sigma' must be > 0 (pixels), got {c.blur_sigma}")
    for key in ("scribble_keep", "label_dropout"):
        if not 0.0 <= getattr(c, key) <= 1.0:
            raise ConfigError(f"{source}: 'controlnet.{key}' must be in [0, 1], got {getattr(c, key)}")
    if c.control_channels is not None and c.control_channels not in (1, 3, 4):
        raise ConfigError(f"{source}: 'controlnet.control_channels' must be 1, 3 or 4 (or null: data.channels), "
                          f"got {c.control_channels!r}")
    widths = c.hint_channels
    if widths is not None and (not isinstance(widths, list) or not widths or not all(map(_positive_int, widths))):
        raise ConfigError(f"{source}: 'controlnet.hint_channels' must be a list of positive integers (e.g. [16] for a "
                          f"pixel run, [16, 32, 96, 256] for latents 8x smaller than the images) or null, "
                          f"got {widths!r}")
