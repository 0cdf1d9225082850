"""The few images of a concept and their captions: the data of textual inversion (Gal et al. 2022) and DreamBooth
(Ruiz et al. 2023).

The concept is named in captions by a phrase: textual inversion's new token (``<concept>``), DreamBooth's rare
identifier with the class noun (``sks square``).  Each image's captions are either

* the templates (finetune.templates) with the phrase for ``{}``: by default Gal et al.'s (their code's
  ``imagenet_templates_small``, "a photo of a {}", ...) or DreamBooth's one, "a {}" ("a [V] [class noun]",
  Ruiz et al. 2023, Sec. 4.1); every image has them all, and each training step draws one; or
* the folder's own captions (metadata.jsonl or .txt files, :mod:`ddpmlab.data.captions`) with the phrases
  finetune.replace lists (e.g. "red square", "square in red") replaced by the concept's, so that the other words
  (size, position) stay; captions without any of them are left out, and an image left without one is refused.

DreamBooth's class prompts, which the base model draws its class images from, are the same captions with the
class noun where the concept was ("a square").
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from ddpmlab.data.captions import CaptionedDataset, CaptionedImageFolder
from ddpmlab.data.images import ImageFolderDataset
from ddpmlab.errors import DataError

# Gal et al. 2022's captions of the concept's images (textual_inversion, ldm/data/personalized.py; diffusers'
# textual_inversion.py: imagenet_templates_small)
GAL_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
DREAMBOOTH_TEMPLATES = ("a {}",)  # Ruiz et al. 2023, Sec. 4.1: "a [identifier] [class noun]"


def concept_phrase(finetune) -> str:
    """How captions name the concept: the token (textual inversion) or "token class_word" (DreamBooth)."""
    if finetune.method == "dreambooth":
        return f"{finetune.token} {finetune.class_word}"
    return str(finetune.token)


def templates(finetune) -> Sequence[str]:
    if finetune.templates:
        return list(finetune.templates)
    return DREAMBOOTH_TEMPLATES if finetune.method == "dreambooth" else GAL_TEMPLATES


def replace_phrases(text: str, phrases: Sequence[str], by: str) -> Optional[str]:
    """``text`` with each whole-word occurrence of ``phrases`` (any case, the longest first) replaced by ``by``;
    None where it holds none of them."""
    pattern = "|".join(re.escape(p.strip()) for p in sorted(phrases, key=len, reverse=True))
    out, n = re.subn(rf"(?<!\w)(?:{pattern})(?!\w)", lambda m: by, text, flags=re.IGNORECASE)
    return out if n else None


def _replaced_captions(folder: CaptionedImageFolder, phrases: Sequence[str], by: str) -> List[tuple]:
    out = []
    for name, captions in zip(folder.files, folder.captions):
        kept = tuple(c for c in (replace_phrases(t, phrases, by) for t in captions) if c is not None)
        if not kept:
            raise DataError(f"data.path: no caption of '{os.path.relpath(name, folder.root)}' in '{folder.root}' "
                            f"holds any of finetune.replace "
                            f"({', '.join(phrases)}): {captions[0]!r}; add the phrase its captions use, or set "
                            "finetune.replace=null (captions from finetune.templates)")
        out.append(kept)
    return out


def concept_images(cfg, phrase: Optional[str] = None):
    """The concept's images of data.path with their captions naming it by ``phrase`` (default
    :func:`concept_phrase`): a dataset of ``(x, y, i)`` with ``captions[i]`` (module docstring)."""
    d, f = cfg.data, cfg.finetune
    phrase = concept_phrase(f) if phrase is None else phrase
    if d.dataset != "folder" or not d.path:
        raise DataError(f"data.path: the concept's images must be a folder (data.dataset=folder, data.path=DIR), got "
                        f"data.dataset={d.dataset} data.path={d.path}")
    size = list(d.image_size) * (2 if len(d.image_size) == 1 else 1)
    if f.replace:
        folder = CaptionedImageFolder(d.path, tuple(size), d.channels)
        return CaptionedDataset(folder, _replaced_captions(folder, f.replace, phrase))
    images = ImageFolderDataset(d.path, tuple(size), d.channels)
    captions = tuple(t.format(phrase) for t in templates(f))
    return CaptionedDataset(images, [captions] * len(images))


def class_prompts(cfg, instance: Sequence[tuple]) -> List[str]:
    """DreamBooth's class prompts: the instance captions ``instance`` with the class noun where the concept is
    named, each once, in their order."""
    f = cfg.finetune
    concept, noun = concept_phrase(f), str(f.class_word)
    seen: dict = {}
    for captions in instance:
        for text in captions:
            seen.setdefault(replace_phrases(text, [concept], noun) or text, None)
    return list(seen)
