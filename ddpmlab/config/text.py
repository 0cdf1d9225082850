"""The text-conditioning keys of a config (text.*, unet/dit.context_dim and pooled_dim): their checks, each error
naming the keys and their values.

Never changes the config.  A frozen encoder's widths are in its folder (config.json): they are checked where the
folder is read (:func:`ddpmlab.models.text_to_image.check_text_widths`); the own encoder's are config keys
(``text.width``) and are checked here, before any folder is read.
"""

from __future__ import annotations

from ddpmlab.config.sections import Config
from ddpmlab.errors import ConfigError

OWN = "own"  # text.encoder: the run's own encoder (ddpmlab.models.text.OWN)
POOLINGS = ("eos", "mean")  # text.pooling (ddpmlab.models.text_encoder.POOLINGS)


def validate_text(cfg: Config, source: str) -> None:
    """Check the cross-attention keys of the UNet and the DiT, the text section, and the own encoder's width
    against the denoiser's."""
    _validate_context_keys(cfg, source)
    _validate_text_section(cfg, source)
    _validate_own_widths(cfg, source)


def _validate_context_keys(cfg: Config, source: str) -> None:
    """unet/dit.context_dim and pooled_dim (Rombach et al. 2022, Sec. 3.3; Chen et al. 2023, Sec. 2.3)."""
    for section in ("unet", "dit"):
        u = getattr(cfg, section)
        for key in ("context_dim", "pooled_dim"):
            value = getattr(u, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{source}: '{section}.{key}' must be a positive integer (an embedding width) or "
                                  f"null, got {value!r}")
        if section == "unet" and u.positions and u.context_dim is None and cfg.model.kind == "unet":
            raise ConfigError(f"{source}: unet.positions=true embeds positions in the transformer blocks that read "
                              "text; set unet.context_dim (text) or unet.positions=false")
        if u.context_dim is None and u.pooled_dim is not None:
            raise ConfigError(f"{source}: {section}.pooled_dim={u.pooled_dim} adds a pooled text embedding, but "
                              f"{section}.context_dim is null (no text conditioning); set {section}.context_dim or "
                              "drop it")
    u = cfg.unet
    if u.context_dim is not None and cfg.model.kind != "unet":
        raise ConfigError(f"{source}: unet.context_dim={u.context_dim} gives the UNet cross-attention, but "
                          f"model.kind is {cfg.model.kind!r}; set model.kind=unet or unet.context_dim=null"
                          + (" (a DiT reads text with dit.context_dim)" if cfg.model.kind == "dit" else ""))
    for section in ("unet", "dit"):
        if getattr(cfg, section).context_dim is not None and cfg.model.condition != "none":
            raise ConfigError(f"{source}: {section}.context_dim (text) and model.condition={cfg.model.condition} "
                              "cannot be combined; set one of them")


# the least value of text.max_length and text.depth, and how an error says it (the other integer keys: 1)
_TEXT_INT_BOUNDS = {"max_length": (2, "an integer >= 2 (start and end tokens)"),
                    "depth": (0, "an integer >= 0 (0: each token's embedding alone, a bag of words)")}


def _validate_text_section(cfg: Config, source: str) -> None:
    """The text section's own keys, and data that has captions."""
    x = cfg.text
    for key in ("max_length", "vocab_size", "width", "depth", "heads"):
        value, (least, what) = getattr(x, key), _TEXT_INT_BOUNDS.get(key, (1, "a positive integer"))
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{source}: 'text.{key}' must be {what}, got {value!r}")
    if not 0.0 <= x.caption_dropout < 1.0:
        raise ConfigError(f"{source}: 'text.caption_dropout' must be in [0, 1) (0.1 in Stable Diffusion), "
                          f"got {x.caption_dropout}")
    if not 0.0 <= x.word_dropout < 1.0:
        raise ConfigError(f"{source}: 'text.word_dropout' must be in [0, 1) (0.1-0.2 is a start), got {x.word_dropout}")
    if x.word_dropout > 0 and x.encoder not in (None, OWN) and x.cache:
        raise ConfigError(f"{source}: text.word_dropout={x.word_dropout} makes captions the embedding cache of "
                          f"{x.encoder} does not hold; set text.cache=false (encoded each step) or text.word_dropout=0")
    if x.pooling not in POOLINGS:
        raise ConfigError(f"{source}: text.pooling={x.pooling!r} is not one of {', '.join(POOLINGS)}")
    if x.width % x.heads:
        ok = [h for h in range(1, min(x.width, 32) + 1) if x.width % h == 0]
        raise ConfigError(f"{source}: text.heads={x.heads} does not divide text.width={x.width}; choose text.heads "
                          f"among {ok}")
    if x.encoder is not None and not str(x.encoder).strip():
        raise ConfigError(f"{source}: 'text.encoder' is empty; set it to own, a text encoder folder, or null")
    if x.encoder is not None and cfg.data.dataset not in ("folder", "webdataset"):
        raise ConfigError(f"{source}: text.encoder is set but data.dataset is {cfg.data.dataset!r}, which has no "
                          "captions; set data.dataset=folder and data.path to images with metadata.jsonl or .txt "
                          "captions, or text.encoder=null")


def _validate_own_widths(cfg: Config, source: str) -> None:
    """text.encoder=own: the denoiser's context_dim (and pooled_dim, where set) must be text.width, the width of
    the tokens (and of the pooled [EOS] token) the own encoder gives."""
    if cfg.text.encoder != OWN or cfg.model.kind not in ("unet", "dit"):
        return
    section, width = cfg.model.kind, cfg.text.width
    d = getattr(cfg, section)
    for key, value in (("context_dim", d.context_dim), ("pooled_dim", d.pooled_dim)):
        if value is not None and value != width:
            raise ConfigError(f"{source}: {section}.{key}={value} but the own text encoder gives "
                              f"{'tokens' if key == 'context_dim' else 'a pooled embedding'} {width} wide "
                              f"(text.width={width}); set {section}.{key}={width} or text.width={value}")
