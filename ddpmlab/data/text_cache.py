"""Caption embeddings of a frozen text encoder, computed once and cached on disk, as the latents are
(:mod:`ddpmlab.data.latents`).

Every distinct caption of the data (and the empty caption, classifier-free guidance's unconditional prompt)
is encoded once into ``<cache_dir>/text/<key>.safetensors``: ``tokens`` (N, L, D), ``mask`` (N, L) bool,
``pooled`` (N, P) where the encoder has one, row i the i-th caption in sorted order (the captions themselves
in the file's metadata).  The key hashes the captions, the encoder's weights and its tokenizer (files and
length: ``encoder.identity``), so new captions, other weights or another tokenizer never reuse stale
embeddings.  A training step then looks its captions up (:meth:`CaptionEmbeddings.lookup`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.data.captions import distinct_captions

TEXT_CACHE_VERSION = "1"
TEXT_CACHE_FOLDER = "text"  # below the cache folder, beside latents/ and reference/


@dataclass
class CaptionEmbeddings:
    """The embeddings of ``captions`` (distinct, row i = captions[i]) on the CPU."""

    captions: list
    tokens: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L) bool
    pooled: Optional[torch.Tensor]  # (N, P) or None

    def __post_init__(self):
        self.row = {c: i for i, c in enumerate(self.captions)}

    def rows(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,) the row of each text; a KeyError names a text that is not cached."""
        missing = [t for t in texts if t not in self.row]
        if missing:
            raise KeyError(f"caption not in the embedding cache: {missing[0]!r}")
        return torch.tensor([self.row[t] for t in texts], dtype=torch.int64)

    def lookup(self, texts: Sequence[str]) -> tuple:
        """``(tokens (B, L, D), mask (B, L), pooled (B, P) or None)`` of ``texts``, as the encoder gives them."""
        i = self.rows(texts)
        return self.tokens[i], self.mask[i], None if self.pooled is None else self.pooled[i]


def text_cache_key(captions: Sequence[str], encoder_identity: str) -> str:
    """sha256 of (cache version, the distinct captions, the encoder's weights, tokenizer and length)."""
    h = hashlib.sha256(f"{TEXT_CACHE_VERSION}|{encoder_identity}|".encode())
    for c in sorted(set(captions)):
        h.update(c.encode("utf-8") + b"\x00")
    return h.hexdigest()[:32]


def text_cache_file(cache_dir, captions: Sequence[str], encoder_identity: str) -> Path:
    """``<cache_dir>/text/<key>.safetensors`` of these captions and this encoder."""
    return Path(cache_dir) / TEXT_CACHE_FOLDER / f"{text_cache_key(captions, encoder_identity)}.safetensors"


def encode_captions(encode: Callable[[list], object], captions: Sequence[str], batch_size: int = 64,
                    bar=None) -> CaptionEmbeddings:
    """The embeddings of ``captions`` in order, ``encode(list of str)`` (a record of ``tokens``, ``mask`` and
    ``pooled``: a text encoder's :class:`~ddpmlab.models.text_condition.TextCondition`) called on ``batch_size``
    of them at a time; float32 on the CPU."""
    parts = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        out = encode(chunk)
        tokens, mask, pooled = out.tokens, out.mask, out.pooled
        parts.append((tokens.float().cpu(), mask.bool().cpu(), None if pooled is None else pooled.float().cpu()))
        if bar is not None:
            bar.update(len(chunk))
    pooled = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return CaptionEmbeddings(list(captions), torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                             pooled)


def _read(cache_file: Path, captions: list) -> Optional[CaptionEmbeddings]:
    """The cache entry, or None when it is damaged or holds other captions."""
    try:
        with safe_open(str(cache_file), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("captions", "null"))
        t = load_file(str(cache_file))
        emb = CaptionEmbeddings(stored, t["tokens"], t["mask"].bool(), t.get("pooled"))
    except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
        return None
    n = len(captions)
    ok = (stored == captions and emb.tokens.ndim == 3 and len(emb.tokens) == n
          and emb.mask.shape == emb.tokens.shape[:2] and (emb.pooled is None or len(emb.pooled) == n))
    return emb if ok else None


def cached_text_embeddings(encoder, captions_per_example: Sequence[tuple], cache_dir, batch_size: int = 64,
                           bar=None) -> tuple[CaptionEmbeddings, Path, bool]:
    """(the embeddings of every distinct caption and the empty one, the cache file, whether it was read).

    ``encoder``: anything with ``.identity`` (str: weights, tokenizer, length) and ``.encode(texts)`` (a frozen
    :class:`~ddpmlab.models.text_encoder.TextEncoder`).  A cache entry that is damaged or holds other
    captions is recomputed; a new one is written atomically."""
    captions = distinct_captions(captions_per_example)
    cache_file = text_cache_file(cache_dir, captions, encoder.identity)
    if cache_file.is_file():
        emb = _read(cache_file, captions)
        if emb is not None:
            return emb, cache_file, True
    with torch.no_grad():
        emb = encode_captions(encoder.encode, captions, batch_size, bar)
    tensors = {"tokens": emb.tokens, "mask": emb.mask}
    if emb.pooled is not None:
        tensors["pooled"] = emb.pooled
    atomic_save_tensors(tensors, cache_file, metadata={"captions": json.dumps(captions),
                                                       "encoder": encoder.identity, "version": TEXT_CACHE_VERSION})
    return emb, cache_file, False
