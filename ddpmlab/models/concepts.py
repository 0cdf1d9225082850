"""New words for a text encoder: tokens added to its vocabulary whose embeddings are learned (textual inversion,
Gal et al. 2022) or start from another word's (DreamBooth's identifier, Ruiz et al. 2023).

A token is added as diffusers' ``load_textual_inversion`` adds one: the tokenizer gets it as one whole word with
the next free id, and the encoder reads that id from a new row of its input embedding; every other weight, and
every row it had, stays as it was.

* the run's own encoder (:class:`~ddpmlab.models.text_encoder.OwnTextEncoder`): the tokenizer's vocabulary grows
  (:meth:`~ddpmlab.data.tokenizer.CaptionTokenizer.add_token`, kept in RUN/tokenizer.json) and so does
  ``token_embedding`` (:func:`grow_own_embedding`): the new rows are part of the run's weights;
* a frozen Hugging Face encoder (:class:`~ddpmlab.models.text_frozen.FrozenTextEncoder`): :class:`ConceptEncoder`
  adds the tokens to its tokenizer and holds their rows, ``concept_vectors`` (k, D), as its only parameter; in
  its forward pass the encoder's input embedding reads ids of the new tokens from them (what
  ``resize_token_embeddings`` and setting those rows computes), so the run's weights hold the rows and not the
  frozen encoder;
* RUN/learned_embeds.safetensors (:func:`save_learned_embeds`): ``{token: (1, D)}``, the layout diffusers'
  textual inversion script writes and ``pipeline.load_textual_inversion`` reads.  A frozen encoder's run keeps
  its tokens there, so the run folder rebuilds the :class:`ConceptEncoder` (:func:`with_learned_tokens`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.data.tokenizer import SPECIAL_TOKENS, CaptionTokenizer
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_encoder import OwnTextEncoder, TextEncoder
from ddpmlab.models.text_frozen import FrozenTextEncoder

CONCEPTS_FILE = "learned_embeds.safetensors"  # in a run folder


# ----------------------------------------------------------------------------- ids of words

def own_word_id(tokenizer: CaptionTokenizer, word: str, key: str = "finetune.init_token") -> int:
    """The id of ``word`` in the run's own vocabulary; a word it does not have (or a special token) is a
    ConfigError naming ``key``."""
    found = tokenizer.tokenizer.token_to_id(tokenizer.normalize(word))
    if found is None or found < len(SPECIAL_TOKENS):
        raise ConfigError(f"{key}: '{word}' is not a word of the run's vocabulary (RUN/tokenizer.json, built from "
                          "its captions); choose a word its captions use")
    return int(found)


def word_id(encoder: TextEncoder, word: str, key: str = "finetune.init_token") -> int:
    """The id of ``word`` as one token of ``encoder``'s tokenizer; a word it splits, or does not know, is a
    ConfigError naming ``key``."""
    if isinstance(encoder, OwnTextEncoder):
        return own_word_id(encoder.tokenizer, word, key)
    ids = frozen_of(encoder).tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"{key}: '{word}' is {len(ids)} tokens for the text encoder's tokenizer, not one; choose "
                          "a word it reads as one token")
    return int(ids[0])


def check_new_token(encoder: TextEncoder, token: str) -> None:
    """A ConfigError unless ``token`` is new to ``encoder``'s vocabulary (textual inversion adds it)."""
    if isinstance(encoder, OwnTextEncoder):
        tok = encoder.tokenizer
        found = tok.tokenizer.token_to_id(tok.normalize(token))
        where = "the run's vocabulary"
    else:
        found = frozen_of(encoder).tokenizer.get_vocab().get(token)
        where = f"the vocabulary of the text encoder {frozen_of(encoder).source}"
    if found is not None:
        raise ConfigError(f"finetune.token '{token}' is already in {where} (id {found}); choose a new word, e.g. "
                          f"<{token.strip('<>')}-1>")


def input_embedding(encoder: TextEncoder) -> torch.Tensor:
    """The encoder's input embedding table (V, D) (its own rows only, not those of learned tokens)."""
    if isinstance(encoder, OwnTextEncoder):
        return encoder.token_embedding.weight
    return frozen_of(encoder).model.get_input_embeddings().weight


def frozen_of(encoder: TextEncoder) -> FrozenTextEncoder:
    return encoder.frozen if isinstance(encoder, ConceptEncoder) else encoder


# ----------------------------------------------------------------------------- the run's own encoder

@torch.no_grad()
def grow_own_embedding(encoder: OwnTextEncoder, rows: torch.Tensor) -> None:
    """Append ``rows`` (k, D) to the own encoder's token embedding (its tokenizer has the k tokens already): the
    table becomes (V + k, D), its first V rows the same tensors' values bit for bit."""
    old = encoder.token_embedding.weight
    grown = nn.Embedding(old.shape[0] + rows.shape[0], old.shape[1], device=old.device, dtype=old.dtype)
    grown.weight.copy_(torch.cat([old, rows.to(old)]))
    encoder.token_embedding = grown


# ----------------------------------------------------------------------------- a frozen encoder

class _Holder:
    """An object every copy of its module shares (``copy.deepcopy`` returns the holder itself)."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo) -> "_Holder":
        return self


class _Lookup(nn.Module):
    """The input embedding of a frozen encoder during one call: ids of the added tokens read from ``vectors``."""

    def __init__(self, base: nn.Embedding, ids: torch.Tensor, vectors: torch.Tensor):
        super().__init__()
        self.base, self.ids, self.vectors = base, ids, vectors
        self.weight = base.weight  # what transformers reads for its dtype and device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        for j, token_id in enumerate(self.ids.tolist()):
            out = torch.where((input_ids == token_id)[..., None], self.vectors[j].to(out.dtype), out)
        return out


class ConceptEncoder(TextEncoder):
    """A frozen Hugging Face encoder with added tokens, ``concept_vectors`` (k, D) their rows (module
    docstring); the frozen encoder is shared by every copy (the EMA's reads its own vectors) and is no part of
    the state dict."""

    trainable = True  # its concept_vectors are part of the text run's weights

    def __init__(self, frozen: FrozenTextEncoder, tokens: Sequence[str], vectors: torch.Tensor):
        super().__init__()
        if len(tokens) != len(vectors):
            raise ValueError(f"{len(tokens)} tokens for {len(vectors)} vectors")
        self._frozen = _Holder(frozen)
        for token in tokens:
            check_new_token(frozen, token)
        frozen.tokenizer.add_tokens(list(tokens))
        self.tokens = list(tokens)
        self.register_buffer("token_ids", torch.tensor(frozen.tokenizer.convert_tokens_to_ids(self.tokens)),
                             persistent=False)
        self.concept_vectors = nn.Parameter(vectors.detach().clone().float())
        self.width, self.pooled_width, self.max_length = frozen.width, frozen.pooled_width, frozen.max_length
        self.kind, self.source = frozen.kind, frozen.source

    @property
    def frozen(self) -> FrozenTextEncoder:
        return self._frozen.obj

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.frozen._apply(fn, *args, **kwargs)  # the shared encoder moves with it
        return self

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frozen.tokenize(texts)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """``ids``, ``mask`` (B, L) -> the frozen encoder's :class:`TextCondition`, the added tokens read from
        ``concept_vectors`` (with gradients to them)."""
        model = self.frozen.model
        base = model.get_input_embeddings()
        with _swapped(model, _Lookup(base, self.token_ids, self.concept_vectors)):
            return self.frozen.call(ids, mask)


@contextlib.contextmanager
def _swapped(model, lookup: nn.Module):
    base = model.get_input_embeddings()
    model.set_input_embeddings(lookup)
    try:
        yield
    finally:
        model.set_input_embeddings(base)


# ----------------------------------------------------------------------------- learned_embeds.safetensors

def save_learned_embeds(path, vectors: Dict[str, torch.Tensor]) -> Path:
    """``{token: (1, D)}`` (each vector a row, float32), written atomically."""
    state = {token: v.detach().float().reshape(1, -1).contiguous().cpu() for token, v in vectors.items()}
    return atomic_save_tensors(state, path, metadata={"format": "pt"})


def read_learned_embeds(path) -> Dict[str, torch.Tensor]:
    """``{token: (D,)}`` of a learned-embeddings file ((D,) or (1, D) per token); one DDPMError line otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DDPMError(f"learned embeddings '{path}' are not a safetensors file "
                        f"({' '.join(str(e).split())[:120]})") from None
    bad = [k for k, v in state.items() if v.dim() not in (1, 2) or (v.dim() == 2 and v.shape[0] != 1)]
    if bad or not state:
        what = f"'{bad[0]}' is {tuple(state[bad[0]].shape)}, not one vector" if bad else "it holds no token"
        raise DDPMError(f"learned embeddings '{path}': {what}")
    return {k: v.reshape(-1) for k, v in state.items()}


def with_learned_tokens(encoder: TextEncoder, run_dir: Optional[Path]) -> TextEncoder:
    """A frozen encoder of a run whose folder has learned tokens (RUN/learned_embeds.safetensors) as the
    :class:`ConceptEncoder` its weights were trained with (their rows then come from the checkpoint); any other
    encoder as it is (an own encoder's tokens are in RUN/tokenizer.json and its table)."""
    path = Path(run_dir) / CONCEPTS_FILE if run_dir is not None else None
    if not isinstance(encoder, FrozenTextEncoder) or path is None or not path.is_file():
        return encoder
    tokens, vectors = learned_rows(read_learned_embeds(path))
    return ConceptEncoder(encoder, tokens, vectors)


def learned_rows(learned: Dict[str, torch.Tensor]) -> Tuple[list, torch.Tensor]:
    """(tokens, (k, D) rows) of ``{token: (D,)}``, in the file's order."""
    tokens = list(learned)
    return tokens, torch.stack([learned[t].float() for t in tokens])
