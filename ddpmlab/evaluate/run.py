"""Evaluate a model: draw samples, extract features once, compute the chosen metrics, save JSON.

Metrics are looked up by name in :data:`METRICS`.  Each entry says what it works on:

* ``"set"`` metrics (fid, kid, is, pr, acc, judge, clean, rough; swd, mmd of 2-D; acc, is, fd of sound) are functions
  ``fn(ctx, which) -> {name: value}`` of one set of points, ``which`` being ``"samples"``
  (drawn from the model) or ``"data"`` (as many data points, the baseline a perfect model
  would reach with this number of samples);
* ``"model"`` metrics ``fn(ctx) -> {name: value}`` use the model directly (e.g. a
  likelihood); register one with :func:`register_metric` and ``ddpm eval --metrics`` knows it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ddpmlab.data import load_mnist, make_toy
from ddpmlab.errors import OPTION, DDPMError, OptionError
from ddpmlab.evaluate import metrics as M
from ddpmlab.evaluate.features import Extractor, batches, build_extractor, extract
from ddpmlab.evaluate.judges import (ROUGH_REFERENCE_N, check_judge_shape, clean_share, honest_confident_share,
                                     honest_scores, load_digit_judge, rough_level, rough_share)
from ddpmlab.evaluate.prompt import eval_prompts, prompt_metric
from ddpmlab.evaluate.reference import Reference, reference_statistics, without
from ddpmlab.evaluate.mel_sound import as_sound
from ddpmlab.evaluate.speech_classifier import reference_data, speech_extractor
from ddpmlab.evaluate.toy import mmd_rbf, sliced_wasserstein
from ddpmlab.runs import Run, SamplingPlan, SamplingRequest, draw_samples, load_run, plan_request


@dataclass
class EvalSettings:
    """Everything that decides an evaluation's numbers (saved with the results)."""

    metrics: List[str] = field(default_factory=list)  # empty: the defaults for the data kind
    n: int = 1000
    sampler: Optional[str] = None  # default: as the run samples (its recommendation, else its own sampler and steps)
    steps: Optional[int] = None  # default: the sampler's own (ddpm: T, others 50)
    sampler_options: Dict[str, object] = field(default_factory=dict)
    step_schedule: Optional[str] = None  # which timesteps the sampler visits (default: the sampler's own)
    guidance: Optional[float] = None  # classifier-free guidance scale (default: the run's train.sample_guidance)
    label: Optional[object] = None  # one class (name or index) for all samples; default: the classes in turn
    prompts: Optional[List[str]] = None  # a text run's prompts, in turn (default: training captions of the data)
    seed: int = 0
    batch_size: int = 256
    extractor: str = "classifier"
    inception_weights: Optional[str] = None
    weights: str = "ema"
    baseline: bool = True  # also score n data points against the same reference
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    is_splits: int = 10


@dataclass(frozen=True)
class Metric:
    fn: Callable
    kind: str  # "image", "toy", "audio" (several joined by "|") or "any": the data it applies to
    per_set: bool  # True: fn(ctx, which) on samples and data; False: fn(ctx) once
    help: str


METRICS: Dict[str, Metric] = {}


def register_metric(name: str, fn: Callable, kind: str = "any", per_set: bool = False, help: str = "") -> None:
    """Make ``name`` available to ``ddpm eval --metrics`` (see the module docstring for ``fn``)."""
    METRICS[name] = Metric(fn, kind, per_set, help)


class EvalContext:
    """What the metrics share, computed lazily once: samples, features, reference statistics."""

    def __init__(self, cfg, model, schedule, dataset, settings: EvalSettings, device, progress: bool = True,
                 extractor: Optional[Extractor] = None, reference: Optional[Reference] = None,
                 cache_dir: Optional[str] = None, use_cache: bool = True, run: Optional[Run] = None):
        """A bad setting is an OptionError about its field of :class:`EvalSettings` ('n', 'metrics', 'steps',
        ...), named by the front end that catches it."""
        self.cfg, self.model, self.schedule, self.dataset = cfg, model, schedule, dataset
        self.kind = "audio" if getattr(dataset, "is_audio", False) else "image" if dataset.is_image else "toy"
        self.s, self.device, self.progress = settings, torch.device(device), progress
        self.cache_dir, self.use_cache = cache_dir, use_cache
        if extractor is not None:
            self.__dict__["extractor"] = extractor
        if reference is not None:
            self.__dict__["reference"] = reference
        if run is not None:  # the loaded run (its folder: recommendation, class names)
            self.__dict__["run"] = run

    @property
    def is_image(self) -> bool:
        return bool(self.dataset.is_image)

    @cached_property
    def run(self) -> Run:
        return Run(self.cfg, self.model, self.schedule, self.device)

    @property
    def request(self) -> SamplingRequest:
        s = self.s  # a text run: one prompt per sample (evaluate.prompt.eval_prompts)
        prompts = eval_prompts(self.dataset, s.prompts, s.n, s.seed) if self.run.is_text else s.prompts
        return SamplingRequest(s.sampler, s.steps, s.step_schedule, dict(s.sampler_options), s.label, s.guidance,
                               s.seed, 1 if prompts else s.n, prompts=prompts)

    @cached_property
    def plan(self) -> SamplingPlan:
        """The sampler call as every front end makes it (as the run says where the settings say nothing)."""
        return plan_request(self.run, self.request, log=lambda m: None)

    @property
    def steps(self) -> int:
        return self.plan.steps

    @property
    def num_classes(self) -> int:
        return int(self.cfg.model.num_classes or 0)

    @cached_property
    def samples(self):
        """(x (n, *shape), labels (n,) or None): samples of the model; conditional runs cycle the classes."""
        s, plan = self.s, self.plan
        x = draw_samples(self.run, plan, s.n, seed=s.seed, batch_size=s.batch_size, progress=self.progress)
        return as_sound(self.run, x, seed=s.seed), plan.labels  # a mel run's images made sound: scored end to end

    @property
    def baseline_n(self) -> int:
        """Data points in the baseline: n, at most half the data set (the rest is its reference)."""
        return self.s.n if self.kind == "toy" else min(self.s.n, len(self.dataset) // 2)

    @cached_property
    def data_index(self) -> torch.Tensor:
        """Which images of the data set form the baseline (a seeded random choice)."""
        g = torch.Generator().manual_seed(self.s.seed)
        return torch.randperm(len(self.dataset), generator=g)[:self.baseline_n].sort().values

    @cached_property
    def data(self):
        """(x (n, *shape), labels (n,)): data points for the baseline (fresh ones for 2-D sets)."""
        if self.kind == "toy":
            return self._fresh_toy(20_000 + self.s.seed), None
        return self._images(self.data_index)

    def _images(self, idx: torch.Tensor):
        if getattr(self.dataset, "x", None) is not None:
            return self.dataset.x[idx], self.dataset.y[idx]
        items = [self.dataset[int(i)] for i in idx]
        # (x, y) or a captioned folder's (x, y, index)
        return torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])

    @cached_property
    def rough_level(self) -> float:
        """The roughness of the roughest of up to 500 data images outside the baseline (a seeded choice)."""
        outside = torch.ones(len(self.dataset), dtype=torch.bool)
        outside[self.data_index] = False
        idx = outside.nonzero().flatten()
        g = torch.Generator().manual_seed(self.s.seed + 1)
        return rough_level(self._images(idx[torch.randperm(len(idx), generator=g)[:ROUGH_REFERENCE_N]])[0])

    @cached_property
    def judge(self):
        return load_digit_judge(self.device)

    @cached_property
    def judge_real(self) -> float:
        """The honest confident share of the 500 held-out bundled MNIST test digits (never seen by the judge)."""
        return honest_confident_share(load_mnist("test")[0], self.judge)

    def points(self, which: str):
        return self.samples if which == "samples" else self.data

    def _fresh_toy(self, seed: int) -> torch.Tensor:
        d = self.cfg.data
        return make_toy(d.toy, self.s.n, d.toy_noise, seed=seed)

    @cached_property
    def toy_reference(self) -> torch.Tensor:
        """n fresh points of the 2-D data set, drawn with a seed the training set never used."""
        return self._fresh_toy(10_000 + self.s.seed)

    @cached_property
    def extractor(self) -> Extractor:
        if self.kind == "audio":  # the spoken-digit classifier, its logits in the data's class order
            return speech_extractor(self.dataset.class_names if self.num_classes else (), self.device)
        return build_extractor(self.s.extractor, tuple(self.dataset.sample_shape), self.s.inception_weights,
                               self.device, data=self.dataset)  # a shapes folder: the shapes classifier

    @cached_property
    def reference(self) -> Reference:
        return reference_statistics(self.dataset, self.extractor, _describe_data(self.cfg, self.dataset),
                                    cache_dir=self.cache_dir, use_cache=self.use_cache,
                                    batch_size=self.s.batch_size, progress=self.progress)

    @cached_property
    def _held_out_reference(self) -> Reference:
        return without(self.reference, self.data_index, self.features("data"))

    def ref(self, which: str) -> Reference:
        """The reference a set is scored against: the whole data set for samples, the images
        outside the baseline for the baseline (never the baseline images themselves)."""
        return self.reference if which == "samples" else self._held_out_reference

    def _features(self, which: str):
        x, _ = self.points(which)
        return extract(self.extractor, batches(x, self.s.batch_size), total=len(x), with_logits=True,
                       progress=self.progress, desc=f"features ({which})")

    @cached_property
    def _sample_features(self):
        return self._features("samples")

    @cached_property
    def _data_features(self):
        return self._features("data")

    def features(self, which: str) -> torch.Tensor:
        return (self._sample_features if which == "samples" else self._data_features)[0]

    def logits(self, which: str) -> torch.Tensor:
        return (self._sample_features if which == "samples" else self._data_features)[1]


def _describe_data(cfg, dataset=None) -> str:
    d, where = cfg.data, f" {cfg.data.path}" if cfg.data.dataset == "folder" else ""
    return getattr(dataset, "description", None) or f"{d.dataset}{where} split={d.split}"


# --- the metrics -------------------------------------------------------------------------

def _fid(ctx: EvalContext, which: str) -> dict:
    return {"fid": M.fid(ctx.ref(which).sums, ctx.features(which))}


def _kid(ctx: EvalContext, which: str) -> dict:
    mean, std = M.kid(ctx.ref(which).features, ctx.features(which), ctx.s.kid_subsets, ctx.s.kid_subset_size,
                      seed=ctx.s.seed)
    return {"kid": mean, "kid_std": std}


def _is(ctx: EvalContext, which: str) -> dict:
    mean, std = M.inception_score(ctx.logits(which), ctx.s.is_splits, seed=ctx.s.seed)
    return {"is": mean, "is_std": std}


def _pr(ctx: EvalContext, which: str) -> dict:
    p, r = M.precision_recall(ctx.ref(which).features, ctx.features(which), ctx.s.pr_k)
    return {"precision": p, "recall": r}


def _acc(ctx: EvalContext, which: str) -> dict:
    if not ctx.num_classes:
        raise OptionError("metrics", f"{OPTION}: acc (classifier accuracy of conditional samples) needs a "
                                     "class-conditional run (model.num_classes); drop 'acc' for this run")
    if ctx.s.extractor not in ("classifier", "shapes"):
        raise OptionError("metrics", f"{OPTION}: acc needs the classifier extractor (the digit or shapes classifier "
                                     "decides the class)")
    return {"acc": M.class_accuracy(ctx.logits(which), ctx.points(which)[1])}


def _pictures(ctx: EvalContext, which: str) -> torch.Tensor:
    """The images of a set as a picture shows them: clamped to [-1, 1]."""
    return ctx.points(which)[0].clamp(-1, 1)


def _judge(ctx: EvalContext, which: str) -> dict:
    try:
        check_judge_shape(ctx.dataset.sample_shape)
    except DDPMError as e:
        raise OptionError("metrics", f"{OPTION}: judge: {e}") from None
    if which == "data":  # the reference: real digits the judge never saw
        return {"judge": ctx.judge_real}
    return honest_scores(_pictures(ctx, which), ctx.judge, ctx.judge_real, ctx.s.batch_size)


def _clean(ctx: EvalContext, which: str) -> dict:
    return {"clean": clean_share(_pictures(ctx, which))}


def _rough(ctx: EvalContext, which: str) -> dict:
    return {"rough": rough_share(_pictures(ctx, which), ctx.rough_level)}


def _swd(ctx: EvalContext, which: str) -> dict:
    gen = torch.Generator().manual_seed(ctx.s.seed)
    return {"swd": sliced_wasserstein(ctx.points(which)[0], ctx.toy_reference, generator=gen)}


def _mmd(ctx: EvalContext, which: str) -> dict:
    return {"mmd": mmd_rbf(ctx.points(which)[0], ctx.toy_reference)}


register_metric("fid", _fid, "image", True, "Frechet distance of features (Heusel et al. 2017)")
register_metric("kid", _kid, "image", True, "kernel distance: unbiased MMD^2, cubic kernel (Binkowski et al. 2018)")
register_metric("is", _is, "image|audio", True, "Inception Score of the extractor's class probabilities")
register_metric("pr", _pr, "image", True, "improved precision and recall, k=3 (Kynkaanniemi et al. 2019)")
register_metric("acc", _acc, "image|audio", True, "classifier accuracy of class-conditional samples")
register_metric("judge", _judge, "image", True, "honest confident share: the digit judge (with a reject class) "
                "calls it a digit with p >= 0.8; 1x28x28 only; data: the 500 held-out MNIST test digits")
register_metric("clean", _clean, "image", True, "clean-background share: mean border brightness below 20/255")
register_metric("rough", _rough, "image", True, "rough share: rougher than all of 500 data images (grain)")
register_metric("prompt", prompt_metric, "image", False, "prompt adherence of a text run on a shapes folder "
                "(exact scorer): shares right, seen and held-out colour-shape pairs apart")
register_metric("swd", _swd, "toy", True, "sliced Wasserstein distance to fresh data (2-D runs)")
register_metric("mmd", _mmd, "toy", True, "MMD^2 with Gaussian kernels to fresh data (2-D runs)")
register_metric("fd", lambda ctx, which: {"fd": _fid(ctx, which)["fid"]}, "audio", True, "sound: Frechet distance "
                "of the spoken-digit classifier's features to held-out clips (Kong et al. 2021, Sec. 5.2)")


def default_metrics(is_image: bool, conditional: bool, extractor: str, shape: Optional[tuple] = None,
                    kind: Optional[str] = None) -> List[str]:
    """The metrics of ``ddpm eval`` without --metrics; ``shape`` (C, H, W): 1x28x28 digits also get the judge."""
    if kind == "audio":  # the data kind (EvalContext.kind), when given
        return (["acc"] if conditional else []) + ["is", "fd"]
    if not is_image:
        return ["swd", "mmd"]
    names = ["fid", "kid", "is", "pr"] + (["acc"] if conditional and extractor == "classifier" else [])
    return names + (["judge"] if shape is not None and _judge_fits(shape) else []) + ["clean", "rough"]


FEATURE_METRICS = ("fid", "kid", "is", "pr", "acc", "fd")  # the metrics that read the extractor's features


def needs_features(names: List[str]) -> bool:
    """Whether any of the metrics ``names`` needs a feature extractor (clean, rough and judge do not)."""
    return any(name in FEATURE_METRICS for name in names)


def _judge_fits(shape) -> bool:
    try:
        check_judge_shape(shape)
    except DDPMError:
        return False
    return True


def check_metrics(names: List[str], is_image: bool, shape: Optional[tuple] = None, kind: Optional[str] = None) -> None:
    """An OptionError about 'metrics' for a metric that is unknown or not for this data (``shape``: the
    images' (C, H, W), when known; ``kind``: the data kind, EvalContext.kind, when known)."""
    if "judge" in names and shape is not None and not _judge_fits(shape):
        raise OptionError("metrics", f"{OPTION}: 'judge' reads 1x28x28 digits, these images are {tuple(shape)}; "
                                     "drop it (clean and rough work at any size)")
    for name in names:
        if name not in METRICS:
            raise OptionError("metrics", f"{OPTION}: unknown metric '{name}'; available: {', '.join(METRICS)}")
        data, kinds = kind or ("image" if is_image else "toy"), METRICS[name].kind.split("|")
        if "any" not in kinds and data not in kinds:
            words = {"image": "images", "toy": "2-D points", "audio": "sound"}
            fits = ", ".join(default_metrics(is_image, kind == "audio", "classifier", kind=kind))
            raise OptionError("metrics", f"{OPTION}: '{name}' is for {' and '.join(words[k] for k in kinds)}; this "
                                         f"run's data are {words[data]} (use {fits})")


def evaluate_model(ctx: EvalContext) -> dict:
    """All requested metrics of ``ctx``: {"metrics": {...}, "data_baseline": {...}, ...}."""
    s = ctx.s
    shape = tuple(ctx.dataset.sample_shape) if ctx.is_image else None
    names = s.metrics or default_metrics(ctx.is_image, bool(ctx.num_classes), s.extractor, shape, ctx.kind)
    check_metrics(names, ctx.is_image, shape, ctx.kind)
    if s.n < 2:
        raise OptionError("n", f"{OPTION} must be at least 2, got {s.n}")
    if (ctx.is_image and "fid" in names) or "fd" in names:
        M.check_fid_samples(s.n, ctx.extractor.num_features)
    t0 = time.time()
    results, baseline, notes = {}, {}, []
    for name in names:
        m = METRICS[name]
        if not m.per_set:
            results.update(m.fn(ctx))
            continue
        results.update(m.fn(ctx, "samples"))
        if s.baseline:
            try:
                baseline.update(m.fn(ctx, "data"))
            except DDPMError as e:  # e.g. too few images left for a held-out baseline
                notes.append(f"{name}: {e}")
    plan = ctx.plan
    resolved = {"sampler": plan.sampler, "steps": plan.steps, "step_schedule": plan.step_schedule,
                "label": plan.label, "guidance": plan.guidance}  # what the run's own settings filled in
    out = {"metrics": results, "data_baseline": baseline if s.baseline else None,
           "settings": {**dataclasses.asdict(s), "metrics": names, **resolved},
           "time_s": round(time.time() - t0, 1)}
    if s.baseline:
        out["baseline"] = {"n": ctx.baseline_n, "notes": notes,
                           "what": ("fresh data points (seed 20000 + seed)" if ctx.kind == "toy" else
                                    f"{ctx.kind} examples drawn from the data set, scored against the others")}
    if ctx.kind != "toy" and "extractor" in ctx.__dict__:
        e = ctx.extractor
        out["extractor"] = {"name": e.name, "identity": e.identity, "num_features": e.num_features}
    if "reference" in ctx.__dict__:
        out["reference"] = ctx.reference.info()
    elif ctx.kind == "toy":
        d = ctx.cfg.data
        out["reference"] = {"dataset": f"toy {d.toy} noise={d.toy_noise}", "n": s.n, "seed": 10_000 + s.seed}
    return out


def result_path(run_dir: Path, step: int, s: EvalSettings, plan: SamplingPlan) -> Path:
    tag = f"step{step:07d}_{s.weights}_{plan.sampler}{plan.steps}_n{s.n}_seed{s.seed}"
    tag += f"_{s.extractor}" if s.extractor != "classifier" else ""
    tag += f"_class{plan.label}" if plan.label is not None else ""
    tag += f"_guidance{plan.guidance:g}" if plan.guidance is not None else ""
    return Path(run_dir) / "eval" / f"{tag}.json"


def save_results(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def format_results(results: dict) -> str:
    """A small table: metric, value for the samples, value for n data points."""
    base = results.get("data_baseline") or {}
    n = (results.get("baseline") or {}).get("n", results["settings"]["n"])
    w = max([10, *(len(k) for k in results["metrics"])])
    lines = [f"{'metric':<{w}} {'samples':>12} {f'data (n={n})':>14}"]
    for k, v in results["metrics"].items():
        b = base.get(k)
        lines.append(f"{k:<{w}} {v:>12.5g} {('' if b is None else f'{b:.5g}'):>14}")
    if "judge" in base:
        lines.append("judge, data: the 500 held-out MNIST test digits (never seen by the judge)")
    return "\n".join(lines)


def evaluate_run(run_dir, settings: EvalSettings, device="auto", *, cache_dir: Optional[str] = None,
                 use_cache: bool = True, progress: bool = True, out: Optional[Path] = None):
    """Evaluate the newest loadable checkpoint of ``run_dir``; save and return (results, JSON path).

    Samples are drawn as the run says where ``settings`` say nothing (its recommended or own
    sampler, steps and guidance); a bad setting is an OptionError about it.
    """
    SamplingRequest(settings.sampler, settings.steps, settings.step_schedule, settings.sampler_options).check()
    run = load_run(run_dir, settings.weights, device)
    ctx = EvalContext(run.cfg, run.model, run.schedule, reference_data(run, settings.extractor), settings, run.device,
                      progress, cache_dir=cache_dir, use_cache=use_cache, run=run)
    ctx.plan  # noqa: B018 - bad steps or options fail before any work
    results = evaluate_model(ctx)
    step = int(run.checkpoint.split("_")[-1])
    results["run"] = {"run_dir": str(run.dir), "checkpoint": run.checkpoint, "step": step,
                      "weights": settings.weights, "device": str(run.device)}
    path = Path(out) if out else result_path(run.dir, step, settings, ctx.plan)
    return results, save_results(results, path)
