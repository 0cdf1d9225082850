"""DreamBooth's class images: samples of the base model for the class prompts, drawn once before fine-tuning
(Ruiz et al. 2023, Sec. 4.2: the prior-preservation loss supervises the model with its own samples).

Image i is drawn for prompt ``prompts[i % len(prompts)]`` as the run draws its own samples (train.sample_sampler,
sample_steps, sample_guidance) and written as RUN/class_images/<i>.png (8 bits, as training images come), each
file whole.  Images are drawn in chunks of :data:`CHUNK`, chunk c from a seed of (train.seed, c) alone, so a run
stopped while drawing them draws the rest on resume, and the images are the same however often it stopped.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, List, Sequence

from PIL import Image

from ddpmlab.atomic import atomic_write_bytes
from ddpmlab.config import Config
from ddpmlab.data.images import to_uint8
from ddpmlab.progress import progress_bar
from ddpmlab.runs import Run, SamplingRequest, draw_samples, own_sampler, plan_request

CLASS_DIR = "class_images"  # in the run folder
CHUNK = 16  # class images drawn at once


def class_image_path(folder: Path, i: int) -> Path:
    return Path(folder) / f"{i:06d}.png"


def class_images_done(folder: Path, n: int) -> int:
    """How many of images 0..n-1 are there, counted from the first."""
    i = 0
    while i < n and class_image_path(folder, i).is_file():
        i += 1
    return i


def chunk_seed(seed: int, chunk: int) -> int:
    return (seed + 1) * 1_000_003 + chunk


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def draw_class_images(load: Callable[[], Run], cfg: Config, folder: Path, prompts: Sequence[str], n: int,
                      progress: bool = True, say: Callable[[str], None] = print) -> List[Path]:
    """Images 0..n-1 in ``folder`` (module docstring); those there already are kept, and ``load`` (the base run,
    its EMA weights) is called only when some are missing.  Returns the n paths."""
    folder = Path(folder)
    done = class_images_done(folder, n)
    if done < n:
        run = load()
        first = done // CHUNK  # a chunk cut short is drawn again whole: the same images
        say(f"class images: {n - first * CHUNK} of {n} to draw from {cfg.finetune.source} for "
            f"{len(prompts)} class prompt(s), e.g. '{prompts[0]}' -> {folder}")
        bar = progress_bar(progress, total=n, initial=first * CHUNK, desc="class images", unit="img")
        try:
            for c in range(first, (n + CHUNK - 1) // CHUNK):
                rows = range(c * CHUNK, min(n, (c + 1) * CHUNK))
                request = SamplingRequest(own_sampler(cfg), cfg.train.sample_steps, n=1, seed=chunk_seed(
                    cfg.train.seed, c), prompts=[prompts[i % len(prompts)] for i in rows])
                plan = plan_request(run, request, log=lambda m: None)
                x = draw_samples(run, plan, seed=plan.seed, progress=False)
                for i, image in zip(rows, to_uint8(x)):
                    atomic_write_bytes(class_image_path(folder, i), _png(image))
                bar.update(len(rows))
        finally:
            bar.close()
    return [class_image_path(folder, i) for i in range(n)]
