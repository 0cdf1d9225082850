"""A run's own tokenizer, built from its training captions with the ``tokenizers`` library.

Word level (a word, or a run of punctuation, is a token), lower-cased after NFKC normalisation, with four
special tokens: ``[PAD]`` (id 0), ``[BOS]``, ``[EOS]``, ``[UNK]`` (a word the captions never had, or one
rarer than the ``vocab_size`` most frequent).  Every caption is read as ``[BOS] words [EOS]`` padded with
``[PAD]`` to ``max_length`` tokens; a longer one keeps its first ``max_length - 2`` words (and its
``[EOS]``), with a one-line warning.  The empty caption is ``[BOS] [EOS]``: the unconditional prompt of
classifier-free guidance.  Saved in the run folder as ``tokenizer.json`` (the library's own format) and
read back from it; the padding length is the caller's (``text.max_length``), not the file's.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import WordLevelTrainer

from ddpmlab.atomic import atomic_write_text
from ddpmlab.errors import DataError

TOKENIZER_FILE = "tokenizer.json"  # in a run folder
PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def _pipeline(tok: Tokenizer) -> Tokenizer:
    """Normalisation, word splitting and the [BOS] ... [EOS] template, on a tokenizer with the special tokens."""
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A {EOS}",
                                            special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return tok


def truncation_warning(text: str, length: int, max_length: int, what: str) -> str:
    """The one line said when a prompt of ``length`` tokens is cut to ``max_length``."""
    shown = text if len(text) <= 60 else text[:57] + "..."
    return (f"prompt '{shown}' has {length} tokens but {what} reads {max_length}: truncated to its first "
            f"{max_length} (raise text.max_length, or shorten the prompt)")


class CaptionTokenizer:
    """The run's tokenizer: :meth:`__call__` maps texts to ``(ids (B, L) int64, mask (B, L) bool)``, L = max_length."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) != SPECIAL_TOKENS.index(t)]
        if missing:
            raise DataError(f"the tokenizer lacks the special tokens {', '.join(missing)} (ids 0-3); build it with "
                            "CaptionTokenizer.train")
        if max_length < 2:
            raise DataError(f"text.max_length must be at least 2 ([BOS] and [EOS]), got {max_length}")
        self.tokenizer = _pipeline(tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(max_length)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    @classmethod
    def train(cls, captions: Iterable[str], max_length: int, vocab_size: int = 10000) -> "CaptionTokenizer":
        """A word-level vocabulary of at most ``vocab_size`` tokens (the special four included), the most
        frequent words of ``captions`` first (ties in the library's order)."""
        tok = Tokenizer(WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = WordLevelTrainer(vocab_size=int(vocab_size), min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                   show_progress=False)
        tok.train_from_iterator((str(c) for c in captions), trainer=trainer)
        return cls(tok, max_length)

    @classmethod
    def load(cls, path, max_length: int) -> "CaptionTokenizer":
        """Read ``tokenizer.json`` (a file, or the run folder that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - missing or damaged: the same advice
            raise DataError(f"'{path}' is not a readable tokenizer ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:120]}); it is written when a text run starts") from None
        return cls(tok, max_length)

    def save(self, path) -> Path:
        """Write ``tokenizer.json`` atomically (``path``: the file, or the run folder)."""
        path = Path(path)
        return atomic_write_text(path / TOKENIZER_FILE if path.is_dir() else path, self.tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def identity(self) -> str:
        """sha256 of the vocabulary and pipeline, and the length: equal identities tokenize equally."""
        return hashlib.sha256(f"{self.tokenizer.to_str()}|{self.max_length}".encode()).hexdigest()

    def normalize(self, word: str) -> str:
        """``word`` as the tokenizer reads it (NFKC, lower case)."""
        return self.tokenizer.normalizer.normalize_str(str(word))

    def add_token(self, token: str) -> int:
        """Add ``token`` (normalised) to the vocabulary as a whole word matched before the word splitting, so that
        ``<concept>`` is one token (textual inversion, DreamBooth's identifier); its id is the next free one, the
        vocabulary's size before.  A token the vocabulary has already is a DataError."""
        word = self.normalize(token)
        if self.tokenizer.token_to_id(word) is not None:
            raise DataError(f"finetune.token '{token}' is already in the run's vocabulary (id "
                            f"{self.tokenizer.token_to_id(word)}); choose a new word, e.g. <{word.strip('<>')}-1>")
        self.tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=True)])
        return self.tokenizer.token_to_id(word)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, [BOS] and [EOS] included, before truncation."""
        return [len(e.ids) for e in self.tokenizer.encode_batch([str(t) for t in texts])]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``: (B, max_length) token ids ([BOS] words [EOS] [PAD]...) and True on the real tokens."""
        L = self.max_length
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.int64)
        for i, (text, enc) in enumerate(zip(texts, self.tokenizer.encode_batch([str(t) for t in texts]))):
            row = enc.ids
            if len(row) > L:
                warnings.warn(truncation_warning(str(text), len(row), L, "the run's text encoder"), stacklevel=2)
                row = row[:L - 1] + [self.eos_id]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        return ids, ids != self.pad_id

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces, special tokens left out."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
