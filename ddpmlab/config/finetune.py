"""The fine-tuning keys of a config (finetune.*, lora.*; ``ddpm finetune``): their checks, each error naming the key.

Never changes the config.  Whether ``lora.target_modules`` names layers of the model is checked where the adapters
are made (:func:`ddpmlab.models.lora.lora_targets`).
"""

from __future__ import annotations

from ddpmlab.config.sections import FINETUNE_METHODS, Config
from ddpmlab.errors import ConfigError


def validate_finetune(cfg: Config, source: str) -> None:
    """Check finetune.method and the lora section (rank, alpha, dropout, target_modules)."""
    f, lora = cfg.finetune, cfg.lora
    if f.method not in FINETUNE_METHODS:
        raise ConfigError(f"{source}: 'finetune.method' is {f.method!r}; choose one of {', '.join(FINETUNE_METHODS)}")
    if f.source is not None and not str(f.source).strip():
        raise ConfigError(f"{source}: 'finetune.source' is empty; give the run or diffusers folder, or null")
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
        raise ConfigError(f"{source}: 'lora.rank' must be a positive integer (e.g. 4), got {lora.rank!r}")
    if not lora.alpha > 0:
        raise ConfigError(f"{source}: 'lora.alpha' must be > 0 (the update is scaled by alpha / rank), "
                          f"got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"{source}: 'lora.dropout' must be in [0, 1), got {lora.dropout}")
    names = lora.target_modules
    if names is not None and (not names or any(not isinstance(n, str) or not n.strip() or "." in n for n in names)):
        raise ConfigError(f"{source}: 'lora.target_modules' must be a list of layer names (the last part of a "
                          f"module name, e.g. [qkv, proj_out, conv1]) or null (the attention projections), "
                          f"got {names!r}")
