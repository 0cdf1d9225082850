"""Prompt adherence of a text-to-image run on the coloured-shapes set: does a sample show what its prompt says?

``ddpm eval RUN --metrics prompt`` on a text run trained on a folder that ``ddpm data shapes DIR --hold-out``
wrote (its ``shapes.json`` says the classes and the held-out colour-shape pairs):

1. **cases** (:func:`prompt_cases`): ``n`` classes, every class equally often (+-1) where ``n`` allows, else a
   seeded subset that gives the seen and the held-out classes their share of ``n``; each a caption in one of the
   wordings training used (:func:`ddpmlab.data.shapes.caption`, its own generator seeded by the eval seed);
2. **samples**: all the captions in one request, one sample each, drawn as ``ddpm sample --prompts`` draws
   (the run's sampler, steps and guidance unless the eval options say otherwise);
3. **scores** (:func:`prompt_scores`): the exact scorer (:func:`ddpmlab.evaluate.shapes.score_shapes`) says
   per sample whether its background is clean and its size, colour, shape and position are the caption's; the
   shares are reported apart for the seen classes and for the held-out ones (``prompt_all_seen``,
   ``prompt_colour_held_out``, ...), beside the samples in each (``prompt_n_seen``, ``prompt_n_held_out``).

A folder written without ``--hold-out`` trained on every class: its samples are all "seen".

For FID and the other set metrics of a text run, :func:`eval_prompts` gives one prompt per sample: the prompts
asked for (``--prompt``, ``--prompts FILE``) in turn, or by default training captions drawn from the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ddpmlab.data.shapes import ShapesSpec, caption
from ddpmlab.data.shapes_folder import SPEC_FILE, read_shapes_spec
from ddpmlab.errors import OPTION, OptionError
from ddpmlab.evaluate.shapes import SCORES, score_shapes
from ddpmlab.runs import draw_samples, plan_request

GROUPS = ("seen", "held_out")


@dataclass
class PromptCases:
    """What the prompt metric asks for: sample i shows class ``classes[i]`` (of the folder's spec), asked for
    by ``prompts[i]``; ``held_out[i]``: the class's colour-shape pair never appeared in training."""

    classes: np.ndarray  # (n,) int64
    prompts: List[str]  # (n,)
    held_out: np.ndarray  # (n,) bool


def held_out_of(spec: ShapesSpec, about: dict) -> List[int]:
    """The classes a shapes folder's description (shapes.json) says training never saw: its ``held_out`` names,
    or none where the folder holds them (``held_out_in_folder``)."""
    if about.get("held_out_in_folder", True):
        return []
    return sorted(spec.class_index(name) for name in about.get("held_out", []))


def _balanced(classes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``classes``, each equally often (+-1): every class once before any twice."""
    if k <= 0 or not len(classes):
        return np.zeros(0, dtype=np.int64)
    return np.resize(rng.permutation(classes), k)


def prompt_cases(spec: ShapesSpec, held_out: Sequence[int], n: int, seed: int = 0) -> PromptCases:
    """``n`` cases (module docstring), in class order: the held-out classes get ``n`` x their share of the
    classes (at least one where there are any and ``n`` >= 2), the seen ones the rest."""
    held = np.asarray(sorted(set(int(i) for i in held_out)), dtype=np.int64)
    seen = np.setdiff1d(np.arange(spec.num_classes), held)
    n_held = int(round(n * len(held) / spec.num_classes))
    if len(held) and len(seen) and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    rng = np.random.default_rng([seed, 5])
    classes = np.sort(np.concatenate([_balanced(seen, n - n_held, rng), _balanced(held, n_held, rng)]))
    words = np.random.default_rng([seed, 6])  # the captions' own generator (the folder's are drawn with [seed, 3])
    prompts = [caption(spec.attributes(int(i)), words) for i in classes]
    return PromptCases(classes, prompts, np.isin(classes, held))


def prompt_scores(x: torch.Tensor, cases: PromptCases, spec: ShapesSpec) -> dict:
    """The shares of samples ``x`` (n, 3, S, S) in [-1, 1] right on each score (clean, size, colour, shape,
    position, all), for the seen and the held-out cases apart: {"prompt_n_seen": 360, "prompt_clean_seen": ...,
    "prompt_clean_held_out": ..., ...}; a group without cases has no keys."""
    scores = score_shapes(x, cases.classes, spec)
    masks = {"seen": torch.from_numpy(~cases.held_out), "held_out": torch.from_numpy(cases.held_out)}
    masks = {g: m for g, m in masks.items() if bool(m.any())}
    out = {f"prompt_n_{g}": int(m.sum()) for g, m in masks.items()}
    for k in SCORES:
        out.update({f"prompt_{k}_{g}": float(scores[k][m].float().mean()) for g, m in masks.items()})
    return out


def prompt_adherence(draw: Callable[[List[str]], torch.Tensor], spec: ShapesSpec, about: dict, n: int,
                     seed: int = 0) -> dict:
    """:func:`prompt_scores` of the samples ``draw(prompts)`` gives for the :func:`prompt_cases` of a shapes
    folder (``spec`` and ``about`` as :func:`~ddpmlab.data.shapes_folder.read_shapes_spec` reads them):
    ``draw`` takes n prompts and returns one image (3, S, S) in [-1, 1] each."""
    cases = prompt_cases(spec, held_out_of(spec, about), n, seed)
    x = draw(cases.prompts)
    if len(x) != len(cases.prompts):
        raise ValueError(f"draw gave {len(x)} images for {len(cases.prompts)} prompts")
    return prompt_scores(x, cases, spec)


def shapes_folder_of(cfg) -> tuple[ShapesSpec, dict]:
    """(spec, description) of the shapes folder a run trained on (its ``data.path``); an OptionError about
    'metrics' that names the missing file and how to make it."""
    folder = Path(str(cfg.data.path or ""))
    path = folder / SPEC_FILE
    if cfg.data.dataset != "folder" or not path.is_file():
        raise OptionError("metrics", f"{OPTION}: prompt reads the shapes set's description '{path}', which is "
                                     "missing: the metric scores runs trained on `ddpm data shapes DIR --hold-out` "
                                     "(data.dataset=folder data.path=DIR); make one and train on it, or drop "
                                     "'prompt'")
    return read_shapes_spec(folder)


def prompt_metric(ctx) -> dict:
    """``ddpm eval --metrics prompt``: the prompt adherence (module docstring) of the run of an
    :class:`~ddpmlab.evaluate.run.EvalContext`, drawn with its settings (sampler, steps, guidance, seed)."""
    run, s = ctx.run, ctx.s
    if not run.is_text:
        raise OptionError("metrics", f"{OPTION}: prompt scores a text-to-image run (text.encoder set); "
                                     f"{run.dir or 'this run'} takes no prompt: drop 'prompt'")
    spec, about = shapes_folder_of(ctx.cfg)
    base = dataclasses.replace(ctx.request, cycle_classes=False)

    def draw(prompts: List[str]) -> torch.Tensor:  # a batch of different prompts, one sample each
        plan = plan_request(run, dataclasses.replace(base, prompts=prompts, n=1), log=lambda m: None)
        return draw_samples(run, plan, batch_size=s.batch_size, progress=ctx.progress)

    return prompt_adherence(draw, spec, about, s.n, s.seed)


def eval_prompts(dataset, asked: Optional[Sequence[str]], n: int, seed: int) -> Optional[List[str]]:
    """One prompt per sample of a text run's evaluation: the prompts ``asked`` for in turn (in equal groups),
    else training captions of ``dataset`` (its ``captions``: one tuple per image) drawn by ``seed``: an image
    with a caption that is not empty, uniformly, then one of its non-empty captions; None where the data has
    no caption list (streamed shards): the run's own prompts then share the samples."""
    if asked:
        return [asked[i * len(asked) // n] for i in range(n)]
    found = getattr(dataset, "captions", None)
    found = found if isinstance(found, (list, tuple)) else []
    captions = [kept for kept in (tuple(t for t in texts if t.strip()) for texts in found) if kept]
    if not captions:
        return None
    rng = np.random.default_rng([seed, 7])
    images = rng.integers(len(captions), size=n)
    return [captions[i][rng.integers(len(captions[i]))] for i in images]
