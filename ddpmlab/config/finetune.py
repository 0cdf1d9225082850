"""The fine-tuning keys of a config (finetune.*, lora.*; ``ddpm finetune``): their checks, each error naming the key.

Never changes the config.  Whether ``lora.target_modules`` names layers of the model is checked where the adapters
are made (:func:`ddpmlab.models.lora.lora_targets`); whether finetune.token is new to a text encoder's vocabulary,
where it is added (:mod:`ddpmlab.models.concepts`).
"""

from __future__ import annotations

from ddpmlab.config.sections import FINETUNE_METHODS, Config
from ddpmlab.errors import ConfigError

CONCEPT_METHODS = ("textual-inversion", "dreambooth")  # the methods that learn a concept from a few captioned images


def validate_finetune(cfg: Config, source: str) -> None:
    """Check finetune.method, the concept keys of textual inversion and DreamBooth, and the lora section."""
    f, lora = cfg.finetune, cfg.lora
    if f.method not in FINETUNE_METHODS:
        raise ConfigError(f"{source}: 'finetune.method' is {f.method!r}; choose one of {', '.join(FINETUNE_METHODS)}")
    if f.source is not None and not str(f.source).strip():
        raise ConfigError(f"{source}: 'finetune.source' is empty; give the run or diffusers folder, or null")
    if f.method in CONCEPT_METHODS:
        _validate_concept(cfg, source)
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


def _word(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value.split()) == 1


def _validate_concept(cfg: Config, source: str) -> None:
    """finetune.token, init_token, class_word, templates, replace, class_images, prior_weight, lora."""
    f, ti = cfg.finetune, cfg.finetune.method == "textual-inversion"
    example = "<concept>" if ti else "sks"
    if not _word(f.token):
        raise ConfigError(f"{source}: 'finetune.token' must be one word naming the concept (e.g. "
                          f"finetune.token={example}), got {f.token!r}")
    if ti and not _word(f.init_token):
        raise ConfigError(f"{source}: 'finetune.init_token' must be one word the text encoder knows, whose embedding "
                          f"the new token starts from (Gal et al. 2022: a coarse description, e.g. square), got "
                          f"{f.init_token!r}")
    if not ti and not (isinstance(f.class_word, str) and f.class_word.strip()):
        raise ConfigError(f"{source}: 'finetune.class_word' must name the subject's class (e.g. "
                          f"finetune.class_word=square: captions say 'a {f.token} square'), got {f.class_word!r}")
    for key in ("templates", "replace"):
        value = getattr(f, key)
        if value is not None and (not isinstance(value, list) or not value
                                  or any(not isinstance(v, str) or not v.strip() for v in value)):
            raise ConfigError(f"{source}: 'finetune.{key}' must be a list of phrases or null, got {value!r}")
    bad = [t for t in f.templates or [] if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"{source}: finetune.templates: '{bad[0]}' must hold '{{}}' once, where the concept goes "
                          "(e.g. 'a photo of a {}')")
    if isinstance(f.class_images, bool) or not isinstance(f.class_images, int) or f.class_images < 0:
        raise ConfigError(f"{source}: 'finetune.class_images' must be an integer >= 0 (0: no prior preservation), "
                          f"got {f.class_images!r}")
    if not f.prior_weight >= 0:
        raise ConfigError(f"{source}: 'finetune.prior_weight' must be >= 0, got {f.prior_weight}")
    if not isinstance(f.lora, bool):
        raise ConfigError(f"{source}: 'finetune.lora' must be true or false, got {f.lora!r}")
