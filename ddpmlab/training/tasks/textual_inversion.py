"""Textual inversion (Gal et al. 2022): ``ddpm finetune TEXT_RUN --method textual-inversion finetune.token=<concept>
finetune.init_token=WORD data.path=FEW_IMAGES``.

A new word, finetune.token, is added to the text encoder's vocabulary (:mod:`ddpmlab.models.concepts`) and its
embedding v*, starting from finetune.init_token's, is the only thing that learns:

    v* = argmin_v E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2     (Gal et al. 2022, Eq. 2)

with y a caption of one of the few images that names the concept by the token (:mod:`ddpmlab.data.concept`),
every weight of the denoiser and the text encoder frozen (a flow run: its velocity loss).  The run's own encoder
gets a row of its token embedding: its gradient is kept on that row alone, and AdamW runs without weight decay
there, so the rows it had stay bit for bit; a frozen encoder's new row is a :class:`ConceptEncoder`'s
``concept_vectors``, the one parameter that trains.  The run is a text run like SRC: ``ddpm sample RUN --prompt "a
<concept> on the left"``; RUN/learned_embeds.safetensors holds ``{token: (1, D)}`` (the EMA's), which diffusers'
``pipeline.load_textual_inversion`` reads for a CLIP text encoder.
"""

from __future__ import annotations

import shlex
from typing import List, Optional, Tuple

import torch
from torch import nn

from ddpmlab.data.captions import draw_captions, drop_captions
from ddpmlab.data.concept import concept_images
from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.models.concepts import (
    CONCEPTS_FILE,
    ConceptEncoder,
    input_embedding,
    own_word_id,
    save_learned_embeds,
    word_id,
)
from ddpmlab.models.text_to_image import TextToImage
from ddpmlab.training.tasks.finetune_base import FinetuneTask
from ddpmlab.training.text import TextTraining


class ConceptText(TextTraining):
    """A concept's captions, drawn and dropped as any text run's, and always read as token ids that the text
    encoder encodes in the forward pass (the learned row needs its gradient; no cached embeddings)."""

    def condition(self, model: TextToImage, examples, step: int, u: torch.Tensor):
        texts = draw_captions(self.captions, examples.tolist(), self.cfg.train.seed, step)
        return model.tokenize(drop_captions(texts, self.cfg.text.caption_dropout, u))


class TextualInversionTask(FinetuneTask):
    """Gal et al. 2022 on the one loop (module docstring)."""

    def __init__(self, cfg, init: Optional[dict] = None):
        super().__init__(cfg, init)
        self.base_rows: Optional[int] = None  # the own encoder's rows before the token (its table's others)

    def read_data(self):
        return concept_images(self.cfg)

    def load_data(self) -> None:
        super().load_data()
        text = ConceptText(self.cfg, self.text.captions)
        text.frozen = self.text.frozen
        self.text = text

    def new_tokens(self, tokenizer: CaptionTokenizer) -> List[Tuple[str, int]]:
        f = self.cfg.finetune
        start = own_word_id(tokenizer, f.init_token)
        tokenizer.add_token(f.token)  # refused when the vocabulary has it
        return [(f.token, start)]

    def network(self) -> nn.Module:
        """SRC's text run with the token added (own encoder: its tokenizer and table; frozen: a ConceptEncoder),
        every parameter frozen but the token's row."""
        model = super().network()
        if self.own_text:
            table = model.text_encoder.token_embedding.weight
            self.base_rows = table.shape[0] - 1
            model.requires_grad_(False)
            table.requires_grad_(True)
            return model
        frozen, f = model.encoder, self.cfg.finetune
        rows = input_embedding(frozen)[[word_id(frozen, f.init_token)]].detach().clone()
        model = TextToImage(model.denoiser, ConceptEncoder(frozen, [f.token], rows))
        if self.init is not None and self.ctx.main:  # the run folder rebuilds the ConceptEncoder from it
            save_learned_embeds(self.ctx.run_dir / CONCEPTS_FILE, {f.token: rows[0]})
        self.ctx.accelerator.wait_for_everyone()
        model.requires_grad_(False)
        model.text_encoder.concept_vectors.requires_grad_(True)
        return model

    def optimizer(self, params) -> torch.optim.Optimizer:
        """AdamW without weight decay: the own table's old rows, whose gradient is zero, then never move."""
        t, device = self.cfg.train, self.ctx.device
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=0.0,
                                 fused=device.type in ("cpu", "cuda"))

    def clip_gradients(self) -> torch.Tensor:
        """The own table's gradient kept on the new row alone, then clipped as every task's."""
        if self.base_rows is not None:
            grad = self.trainee.raw.text_encoder.token_embedding.weight.grad
            if grad is not None:
                grad[:self.base_rows] = 0
        return super().clip_gradients()

    def learned(self, model: TextToImage) -> torch.Tensor:
        """The token's row (1, D) in ``model``."""
        if self.base_rows is not None:
            return model.text_encoder.token_embedding.weight[self.base_rows:].detach()
        return model.text_encoder.concept_vectors.detach()

    def describe(self) -> str:
        f, n = self.cfg.finetune, self.learned(self.trainee.raw).numel()
        return (f"textual inversion of '{f.token}' (from '{f.init_token}') in {self.ctx.run_dir}: {n} parameters "
                f"train, the rest of {self.cfg.finetune.source} frozen; {len(self.dataset)} images, "
                f"{self.cfg.train.steps} steps on {self.ctx.device}, {self.ctx.precision}")

    def finish(self, seconds: float, skipped: int) -> None:
        """The final samples, then RUN/learned_embeds.safetensors (the EMA's row) and how to use it."""
        super().finish(seconds, skipped)
        token = self.cfg.finetune.token
        path = save_learned_embeds(self.ctx.run_dir / CONCEPTS_FILE, {token: self.learned(self.trainee.ema)[0]})
        prompt = shlex.quote(f"a {token}")
        print(f"learned embedding (EMA): {path} ({path.stat().st_size} bytes); ddpm sample "
              f"{shlex.quote(str(self.ctx.run_dir))} --prompt {prompt}")
