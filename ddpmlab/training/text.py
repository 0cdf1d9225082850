"""A text run's captions in training (``text.encoder`` set): an option of ``ddpm train``'s diffusion task.

Each training step shows every example one of its captions, drawn from (train.seed, step, example) alone
(:func:`~ddpmlab.data.captions.draw_captions`), and replaces a share ``text.caption_dropout`` of them by the
empty caption, drawn for the global batch as label dropout is: the unconditional prompt of classifier-free
guidance (GLIDE, Nichol et al. 2022, Sec. 4; Stable Diffusion 1.x: 0.1); ``text.word_dropout`` leaves single
words out of the others (:func:`~ddpmlab.data.captions.drop_words`).  So a resumed run, or another number of
processes, shows the same captions.

What the denoiser reads of them:

* ``text.encoder: own``: token ids (:class:`~ddpmlab.models.text_to_image.PromptTokens`), encoded inside the
  forward pass of the :class:`~ddpmlab.models.text_to_image.TextToImage`, so GLIDE's text transformer learns
  with the denoiser; its tokenizer is built from the captions when the run starts (RUN/tokenizer.json);
* a frozen encoder's folder: its embeddings of every distinct caption, computed once before training and
  cached on disk (``text.cache``; :mod:`ddpmlab.data.text_cache`), looked up per step.

The run's drawings use a few of the training captions, chosen when it starts and listed in
RUN/samples/prompts.txt (:mod:`ddpmlab.runs.prompts`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ddpmlab.config import Config
from ddpmlab.data.captions import draw_captions, drop_captions, drop_words
from ddpmlab.data.text_cache import CaptionEmbeddings, cached_text_embeddings
from ddpmlab.evaluate.reference import default_cache_dir
from ddpmlab.models.text import OWN, build_text_encoder
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_to_image import TextToImage, build_text_to_image, check_text_widths
from ddpmlab.progress import progress_bar
from ddpmlab.runs.prompts import PROMPTS_FILE, drawing_prompts, save_run_prompts


class TextTraining:
    """The captions of a text run's data and what each training step's denoiser reads of them."""

    def __init__(self, cfg: Config, captions: Sequence[tuple]):
        self.cfg, self.captions = cfg, list(captions)
        self.own = cfg.text.encoder == OWN
        self.frozen = None  # a frozen encoder, read in load()
        self.embeddings: Optional[CaptionEmbeddings] = None  # its cached caption embeddings (text.cache)

    def load(self, accelerator, main: bool, progress: bool) -> Optional[str]:
        """Before the run folder exists: check the encoder against the denoiser; a frozen one is read and its
        caption embeddings cached (the main process encodes, the others read its file).  Returns a line to
        print, or None."""
        cfg = self.cfg
        if self.own:
            check_text_widths(cfg, cfg.text.width, cfg.text.width, "the own text encoder (text.width)")
            return None
        self.frozen = build_text_encoder(cfg.text, device=accelerator.device)
        check_text_widths(cfg, self.frozen.width, self.frozen.pooled_width, f"the text encoder {cfg.text.encoder}")
        if not cfg.text.cache:
            return None
        with accelerator.main_process_first():
            bar = progress_bar(progress and main, total=len({t for c in self.captions for t in c}) + 1,
                               desc="encoding captions", unit="caption")
            try:
                self.embeddings, path, hit = cached_text_embeddings(self.frozen, self.captions, default_cache_dir(),
                                                                    bar=bar)
            finally:
                bar.close()
        return (f"captions: {len(self.embeddings.captions)} distinct ({self.frozen.kind}, "
                f"{'read from' if hit else 'encoded once into'} {path})")

    def build(self, run_dir, accelerator) -> TextToImage:
        """The denoiser of the config with its text encoder (an own one initialised from torch's generator, its
        tokenizer read from ``run_dir`` or built from the captions and written there by the main process)."""
        if self.frozen is not None:
            return build_text_to_image(self.cfg, self.frozen)
        with accelerator.main_process_first():
            encoder = build_text_encoder(self.cfg.text, run_dir, self.captions, device=accelerator.device)
        return build_text_to_image(self.cfg, encoder)

    def save_prompts(self, run_dir) -> None:
        """RUN/samples/prompts.txt: a few of the training captions for the run's drawings (kept on resume)."""
        if not (run_dir / PROMPTS_FILE).is_file():
            t = self.cfg.train
            save_run_prompts(run_dir, drawing_prompts(self.captions, t.sample_n, t.seed))

    def condition(self, model: TextToImage, examples, step: int, u: torch.Tensor):
        """What the denoiser reads for ``examples`` at training step ``step``: their captions (drawn here for
        indices (B,) of a dataset; streamed shards' batches bring theirs, a list of B strings already drawn), those
        where ``u`` (B,) < text.caption_dropout made empty, as token ids (own encoder) or embeddings."""
        if isinstance(examples, (list, tuple)):
            texts, keys = list(examples), [f"b{k}" for k in range(len(examples))]
        else:
            keys = examples.tolist()
            texts = draw_captions(self.captions, keys, self.cfg.train.seed, step)
        texts = drop_words(texts, self.cfg.text.word_dropout, self.cfg.train.seed, step, keys)
        texts = drop_captions(texts, self.cfg.text.caption_dropout, u)
        if self.embeddings is not None:
            return TextCondition(*self.embeddings.lookup(texts))
        if self.own:
            return model.tokenize(texts)  # encoded in the forward pass, with gradients
        with torch.no_grad():
            return model.encode(texts)
