"""Prompts of a text-to-image run (``text.encoder`` set): the ones its drawings use, a file of prompts, and
the text part of a sampling plan.

* A run's own prompts: a few of its training captions, chosen when it starts (:func:`drawing_prompts`) and
  listed one a line in ``RUN/samples/prompts.txt``; its sample drawings, and sampling without a prompt,
  use them.
* A request's prompts: each prompt drawn ``n`` times, the samples grouped per prompt (sample i of prompt k
  is row k * n + i); without prompts, the run's own share the ``n`` samples in equal groups.
* :func:`plan_text`: the prompts encoded once each (a prompt over the encoder's context is truncated with a
  one-line warning), and for classifier-free guidance the unconditional branch: the empty prompt, which
  caption dropout trained (GLIDE, Nichol et al. 2022, Sec. 3.2), or a negative prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from ddpmlab.atomic import atomic_write_bytes
from ddpmlab.errors import OPTION, DDPMError, OptionError, mention
from ddpmlab.models.text_condition import TextCondition

PROMPTS_FILE = Path("samples") / "prompts.txt"  # below a run folder
DRAWING_PROMPTS = 8  # the most prompts a run's drawings use


def drawing_prompts(captions: Sequence[tuple], n: int, seed: int, most: int = DRAWING_PROMPTS) -> List[str]:
    """A few of the training captions for a run's drawings: up to ``most`` (and at most ``n``, the samples
    drawn) distinct non-empty captions, picked by ``seed`` and listed in sorted order."""
    distinct = sorted({t for texts in captions for t in texts if t.strip()})
    k = max(min(most, n, len(distinct)), 0)
    return sorted(random.Random(seed).sample(distinct, k))


def save_run_prompts(run_dir, prompts: Sequence[str]) -> Path:
    """Write RUN/samples/prompts.txt, one prompt a line (UTF-8)."""
    path = Path(run_dir) / PROMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, "".join(f"{p}\n" for p in prompts).encode("utf-8"))


def load_run_prompts(run_dir) -> List[str]:
    """The prompts of RUN/samples/prompts.txt ([] without a run folder or the file)."""
    path = Path(run_dir) / PROMPTS_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_prompts_file(path) -> List[str]:
    """The prompts of a text file, one a line (blank lines skipped); a one-line DDPMError for a file that is
    missing, not UTF-8 or without a prompt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DDPMError(f"prompts file '{path}' cannot be read ({e.strerror or e}); give a text file with one "
                        "prompt a line") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DDPMError(f"prompts file '{path}' line {line} is not UTF-8 text; save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DDPMError(f"prompts file '{path}' has no prompt; write one prompt a line")
    return prompts


def prompt_tag(prompts: Optional[Sequence[str]]) -> str:
    """A file-name part for the prompts asked for: '_a-red-circle' for one, '_3prompts' for several, '' for
    the run's own."""
    if not prompts:
        return ""
    if len(prompts) > 1:
        return f"_{len(prompts)}prompts"
    slug = re.sub(r"[^a-z0-9]+", "-", prompts[0].lower()).strip("-")[:40].strip("-")
    return f"_{slug or 'empty'}"


@dataclass
class TextPlan:
    """The text of one sampler call: a prompt per sample, their encodings, the unconditional branch."""

    prompts: List[str]  # (n,): sample i's prompt
    cond: TextCondition  # n rows
    uncond: Optional[TextCondition]  # n rows of the empty or negative prompt (guidance), else None
    per_prompt: int  # samples in each prompt's group (a grid row)
    tag: str  # file-name part (prompt_tag)


def samples_prompts(run, prompts: Optional[Sequence[str]], n: int, log: Callable[[str], None]) -> tuple:
    """(one prompt per sample, samples per prompt): each of ``prompts`` ``n`` times; without prompts, the run's
    own sharing ``n`` samples in equal groups (said in ``log``)."""
    if prompts:
        return [p for p in prompts for _ in range(n)], n
    own = run.prompts
    if not own:
        where = f"'{run.dir / PROMPTS_FILE}' is missing" if run.dir is not None else "it has no run folder"
        raise OptionError("prompt", f"this text-to-image run has no prompts of its own ({where}); give one, e.g. "
                                    f"{OPTION} \"a red circle\"")
    k = min(len(own), n)
    each = f"{n // k}{'+' if n % k else ''} sample{'s' if n >= 2 * k else ''} each"
    log(f"prompts: the run's own {k} ({PROMPTS_FILE}, training captions), {each} (a prompt asked for replaces "
        "them)")
    return [own[i * k // n] for i in range(n)], (n // k if n % k == 0 else n)


def plan_text(run, prompts: Optional[Sequence[str]], negative: Optional[str], n: int, guidance: Optional[float],
              log: Callable[[str], None] = print) -> TextPlan:
    """The text part of a plan on the text run ``run`` (its model a
    :class:`~ddpmlab.models.text_to_image.TextToImage`): ``n`` samples per prompt (module docstring), the
    negative prompt (default "") as the unconditional branch where ``guidance`` is set."""
    per_sample, per_prompt = samples_prompts(run, prompts, n, log)
    distinct = list(dict.fromkeys(per_sample))
    with torch.no_grad():
        encoded = run.model.encode(distinct)  # once a prompt: one truncation warning each
        rows = torch.tensor([distinct.index(p) for p in per_sample], device=encoded.tokens.device)
        uncond = None
        if guidance is not None:
            uncond = run.model.encode(["" if negative is None else negative]).expand(len(per_sample))
    return TextPlan(per_sample, encoded[rows], uncond, per_prompt, prompt_tag(prompts))


def check_prompts(run, prompts: Optional[Sequence[str]], negative: Optional[str]) -> None:
    """An OptionError about 'prompt' or 'negative_prompt' when ``run`` is not text-conditioned."""
    if run.is_text or (not prompts and negative is None):
        return
    option, value = ("prompt", prompts[0]) if prompts else ("negative_prompt", negative)
    raise OptionError(option, f"{OPTION} {value!r}: {run.dir or 'this run'} is not text-conditioned (text.encoder "
                              f"is null), it takes no prompt; ask it for a class with {mention('class')} if it has "
                              "classes, or train a text-to-image run: ddpm train --config shapes_text data.path=DIR")
