"""The text encoder a config's ``text`` section names: ``own`` (GLIDE's small transformer,
:mod:`ddpmlab.models.text_encoder`, its tokenizer built from the captions and kept in the run folder) or a
local Hugging Face folder (frozen, :mod:`ddpmlab.models.text_frozen`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ddpmlab.data.captions import distinct_captions
from ddpmlab.data.tokenizer import TOKENIZER_FILE, CaptionTokenizer
from ddpmlab.errors import ConfigError
from ddpmlab.models.concepts import with_learned_tokens
from ddpmlab.models.text_encoder import OwnTextEncoder, TextEncoder
from ddpmlab.models.text_frozen import FrozenTextEncoder, load_text_encoder

OWN = "own"  # text.encoder: the run's own encoder

__all__ = ["OWN", "FrozenTextEncoder", "OwnTextEncoder", "TextEncoder", "build_text_encoder", "run_tokenizer"]


def run_tokenizer(text_cfg, run_dir=None, captions: Optional[Sequence[tuple]] = None) -> CaptionTokenizer:
    """The own encoder's tokenizer: ``run_dir``/tokenizer.json where it exists (a resumed or finished run),
    else built from ``captions`` (each example's caption tuple) and written there."""
    path = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        return CaptionTokenizer.load(path, text_cfg.max_length)
    if captions is None:
        where = f"'{path}' does not exist" if path is not None else "no run folder was given"
        raise ConfigError(f"the run's tokenizer cannot be read ({where}) nor built (no captions given); "
                          "it is built from the captions when a text run starts")
    tokenizer = CaptionTokenizer.train(distinct_captions(captions, empty=False), text_cfg.max_length,
                                       text_cfg.vocab_size)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def build_text_encoder(text_cfg, run_dir=None, captions: Optional[Sequence[tuple]] = None,
                       device="cpu") -> TextEncoder:
    """The encoder of ``text_cfg`` (the config's ``text`` section; its ``encoder`` must be set): own (freshly
    initialised, its tokenizer from :func:`run_tokenizer`) or the frozen folder it names."""
    name = text_cfg.encoder
    if not name:
        raise ConfigError("text.encoder is null: the run has no text conditioning; set text.encoder=own or a "
                          "local text encoder folder")
    if name == OWN:
        tokenizer = run_tokenizer(text_cfg, run_dir, captions)
        return OwnTextEncoder(tokenizer, text_cfg.width, text_cfg.depth, text_cfg.heads, text_cfg.pooling).to(device)
    # a frozen encoder with tokens learned by textual inversion reads them as the run was trained (RUN/learned_embeds)
    return with_learned_tokens(load_text_encoder(name, text_cfg.max_length, device), run_dir)
