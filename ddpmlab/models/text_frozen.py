"""A frozen Hugging Face text encoder read from a local folder, as a :class:`~ddpmlab.models.text_encoder.TextEncoder`.

``text.encoder: PATH`` names a folder ``transformers`` wrote (``save_pretrained``) of one of :data:`KINDS`:
``CLIPTextModel`` (Stable Diffusion 1.x/2.x), ``CLIPTextModelWithProjection`` (its pooled embedding projected:
SDXL's second encoder) or ``T5EncoderModel`` (Imagen, PixArt-alpha, SD3; a whole T5 folder gives its encoder),
with its tokenizer in the same folder, in ``PATH/tokenizer`` or, for PATH a pipeline's ``text_encoder``
sub-folder, in the ``tokenizer`` folder beside it; PATH may also be such a pipeline folder.  Both are read
with ``local_files_only=True`` (nothing is downloaded) in float32 and never trained.

It is called as its pipelines call it: CLIP without an attention mask, as Stable Diffusion does (its causal
mask keeps the real tokens free of the padding, and the padding's outputs are what a Stable Diffusion UNet
attends to: its TextCondition marks every token real), its pooled embedding at the ``[EOS]`` token
(``pooler_output``, or ``text_embeds`` with the projection); T5 with the attention mask, which the denoiser
applies too (PixArt-alpha), and no pooled embedding.  ``weights_identity`` and
``tokenizer_identity`` (sha256 of the files) key the embedding cache (:mod:`ddpmlab.data.text_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ddpmlab.data.latents import file_sha256
from ddpmlab.data.tokenizer import truncation_warning
from ddpmlab.errors import ConfigError
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_encoder import TextEncoder

KINDS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
EXPECTED = ("a local folder of a Hugging Face text encoder (CLIPTextModel, CLIPTextModelWithProjection or "
            "T5EncoderModel: config.json and its weights, as save_pretrained writes them) with its tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "spiece.model", "vocab.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _bad(path, why: str) -> ConfigError:
    return ConfigError(f"text.encoder '{path}' {why}; it must be {EXPECTED}")


def _model_folder(path: Path) -> Path:
    for folder in (path, path / "text_encoder"):
        if (folder / "config.json").is_file():
            return folder
    raise _bad(path, "has no config.json" if path.is_dir() else
               "does not exist" if not path.exists() else "is not a folder")


def _tokenizer_folder(path: Path, model_dir: Path) -> Path:
    for folder in (model_dir, path, path / "tokenizer", model_dir.parent / "tokenizer"):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise _bad(path, "has no tokenizer (tokenizer.json, or vocab.json with merges.txt, or spiece.model, beside "
                     "config.json or in a tokenizer/ folder)")


def model_kind(path: Path, model_dir: Path) -> str:
    """Which of :data:`KINDS` the folder's config.json describes (a whole T5 is read as its encoder)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise _bad(path, f"has a config.json ({model_dir / 'config.json'}) that is not valid JSON") from None
    arch = (config.get("architectures") or [None])[0] if isinstance(config, dict) else None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if arch in KINDS:
        return arch
    if model_type == "t5":
        return "T5EncoderModel"
    if model_type == "clip_text_model":
        return "CLIPTextModel"
    raise _bad(path, f"holds a {arch or model_type or 'model of no named kind'}, not a text encoder")


def files_identity(folder: Path, names: Sequence[str] = (), suffixes: Sequence[str] = ()) -> str:
    """sha256 over the named files and those with ``suffixes`` in ``folder``: their names and contents."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.name in names or f.name.endswith(tuple(suffixes))))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}|{file_sha256(f)}|".encode())
    return h.hexdigest()


class FrozenTextEncoder(TextEncoder):
    """A transformers text encoder and its tokenizer, frozen (module docstring); build it with
    :func:`load_text_encoder`."""

    trainable = False

    def __init__(self, model, tokenizer, kind: str, max_length: int, source: Path, weights_identity: str,
                 tokenizer_identity: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.kind, self.max_length, self.source = tokenizer, kind, int(max_length), source
        cfg = model.config
        self.width = int(cfg.d_model if kind == "T5EncoderModel" else cfg.hidden_size)
        self.pooled_width = {"CLIPTextModel": self.width, "T5EncoderModel": None}.get(
            kind, getattr(cfg, "projection_dim", None))
        self.weights_identity, self.tokenizer_identity = weights_identity, tokenizer_identity

    @property
    def identity(self) -> str:
        """What its embeddings depend on: weights, tokenizer, length and which tokens are read (the embedding
        cache's key)."""
        padding = "masked" if self.kind == "T5EncoderModel" else "attended"  # the padding tokens' mask
        return f"{self.kind}|{self.weights_identity}|{self.tokenizer_identity}|{self.max_length}|{padding}"

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the denoiser does
        return self

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [str(t) for t in texts]
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        for text, n in zip(texts, lengths):
            if n > self.max_length:
                warnings.warn(truncation_warning(text, n, self.max_length, f"the text encoder {self.source.name}"),
                              stacklevel=3)
        batch = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """``ids``, ``mask`` (B, L) -> :class:`TextCondition` as the module docstring says it is called."""
        return self.call(ids, mask)

    def call(self, ids: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """:meth:`forward` with gradients where something upstream needs them (a token's learned embedding)."""
        if self.kind == "T5EncoderModel":
            out = self.model(input_ids=ids, attention_mask=mask.long())
            return TextCondition(out.last_hidden_state, mask.bool(), None)
        out = self.model(input_ids=ids)
        pooled = out.text_embeds if self.kind == "CLIPTextModelWithProjection" else out.pooler_output
        return TextCondition(out.last_hidden_state, torch.ones_like(mask, dtype=torch.bool), pooled)  # all read


def _context(model, tokenizer, kind: str) -> Optional[int]:
    """The most tokens the encoder reads: CLIP's position table; T5 (relative positions): its tokenizer's limit."""
    if kind != "T5EncoderModel":
        return int(model.config.max_position_embeddings)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else None


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars, notes or warnings from transformers while a folder is read (its errors still raise)."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_text_encoder(path, max_length: int = 77, device="cpu") -> FrozenTextEncoder:
    """The frozen encoder of the folder ``path`` (module docstring), reading ``max_length`` tokens a text
    (at most its context); one-line ConfigError for a folder that is not one."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    path = Path(str(path)).expanduser()
    model_dir = _model_folder(path)
    kind = model_kind(path, model_dir)
    tok_dir = _tokenizer_folder(path, model_dir)
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
               "T5EncoderModel": T5EncoderModel}
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is this folder's
        raise _bad(path, f"has a tokenizer in {tok_dir} that transformers cannot read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:150]})") from None
    if tokenizer.pad_token is None:
        raise _bad(path, f"has a tokenizer ({tok_dir}) without a padding token")
    try:
        with _quiet_transformers():
            model = classes[kind].from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise _bad(path, f"cannot be read as a {kind} ({type(e).__name__}: {' '.join(str(e).split())[:150]})") \
            from None
    context = _context(model, tokenizer, kind)
    if context is not None and max_length > context:
        raise ConfigError(f"text.max_length={max_length} is more than the text encoder '{path}' reads ({context} "
                          f"tokens); set text.max_length={context} or less")
    weights = files_identity(model_dir, ("config.json",), WEIGHT_SUFFIXES)
    encoder = FrozenTextEncoder(model, tokenizer, kind, max_length, path, weights,
                                files_identity(tok_dir, TOKENIZER_FILES))
    return encoder.to(device)
