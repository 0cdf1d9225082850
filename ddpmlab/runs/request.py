"""A sampling request, by name, and the one function that turns it into a sampler call on a run.

A front end (``ddpm sample``/``eval``/``viz``/``upscale``/``img2img``, the demo, benchmarks,
training's sample grids) fills a :class:`SamplingRequest` with what its user asked for and
leaves the rest None; :func:`plan_request` decides the rest as the run says: the sampler that
``ddpm bench samplers RUN`` recommended, else the run's own (train.sample_sampler,
sample_steps and sample_guidance; a distilled student its own), the run's reverse variance,
the class labels and guidance.  Errors are :class:`~ddpmlab.errors.OptionError` about the
request's field names; front ends name them their own way where they catch them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ddpmlab.config import Config
from ddpmlab.diffusion.reverse import check_variance
from ddpmlab.errors import OPTION, ConfigError, OptionError, mention
from ddpmlab.models.conditioned import bind_condition
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.runs.load import Run
from ddpmlab.runs.prompts import check_prompts, plan_text
from ddpmlab.samplers.guidance import TextGuidance, conditioning
from ddpmlab.samplers.registry import SamplerSpec, fit_step_schedule, get_spec
from ddpmlab.samplers.student import check_student_steps

RECOMMENDATION_FILE = "recommended_samplers.json"  # RUN/<this>: written by `ddpm bench samplers RUN`
Label = Union[int, str, None]  # a class: its index or its name


@dataclass(frozen=True)
class SamplingRequest:
    """What one sampler call is asked to do; a field left None is decided as the run says.

    sampler: None -> the run's recommendation (:func:`recommended_sampler`), else its own
      (:func:`default_sampler`).  steps: sampling steps; None -> the sampler's (ddpm: every
      timestep; others 50), at most the timesteps sampling starts from.  step_schedule: which
      timesteps the sampler visits (uniform, karras, ..., or optimized: fitted to the model
      first, :func:`~ddpmlab.samplers.registry.fit_step_schedule`); None -> the sampler's own.
    options: sampler options (eta, variance, threshold, ...; None values are dropped); ddpm's
      variance defaults to the run's diffusion.variance.
    label: one class (name or index) for all samples; guidance: classifier-free guidance scale,
      None -> the conditional run's train.sample_guidance.  cycle_classes: without a label, a
      conditional run's samples take classes 0, 1, ..., K-1, 0, ... as its own samples do.
    cond: a conditioned run's conditioning, (n or 1, C, H, W) (a low-res image upsampled) or (n or 1,
      C * n_mels, frames) (a vocoder's log-mel spectrogram) (sample i gets row i).
    img2img_t0: SDEdit of a given picture noised to timestep t0: sampling runs from t0, and the
      picture keeps its own class (no cycled classes, no run guidance) unless a class is asked for.
    prompts: a text run's prompts, ``n`` samples each, grouped per prompt; None -> the run's own prompts
      (RUN/samples/prompts.txt) sharing the ``n`` samples.  negative_prompt: the unconditional branch of
      classifier-free guidance (None: the empty prompt); guidance on a text run is the text's
      (ddpmlab.runs.prompts).
    """

    sampler: Optional[str] = None
    steps: Optional[int] = None
    step_schedule: Optional[str] = None
    options: Mapping[str, object] = field(default_factory=dict)
    label: Label = None
    guidance: Optional[float] = None
    seed: int = 0
    n: int = 1
    cycle_classes: bool = True
    cond: Optional[torch.Tensor] = None
    img2img_t0: Optional[int] = None
    prompts: Optional[Sequence[str]] = None
    negative_prompt: Optional[str] = None

    def check(self) -> None:
        """Refuse, before any run is loaded, what no run takes: the count, a sampler or step schedule
        name, a variance name, an empty list of prompts."""
        if self.n < 1:
            raise OptionError("n", f"{OPTION} must be at least 1, got {self.n}")
        if self.prompts is not None and (isinstance(self.prompts, str) or not self.prompts
                                         or not all(isinstance(p, str) for p in self.prompts)):
            raise OptionError("prompt", f"{OPTION}: give a list of one prompt or more (strings), got "
                                        f"{self.prompts!r}")
        if self.sampler is not None:
            get_spec(self.sampler).check_step_schedule(self.step_schedule)
        if self.options.get("variance") is not None:
            check_variance(self.options["variance"])


@dataclass
class SamplingPlan:
    """Everything one sampler call needs: sampler, steps, its keyword options, the (guided) model, labels."""

    spec: SamplerSpec
    steps: int
    options: Dict[str, object]
    model: nn.Module
    labels: Optional[torch.Tensor] = None
    step_schedule: Optional[str] = None
    label: Optional[int] = None
    guidance: Optional[float] = None
    cond: Union[torch.Tensor, TextCondition, None] = None  # n rows: a low-res image's (SR3), a mel's or the prompts'
    n: int = 1
    seed: int = 0
    uncond: Optional[TextCondition] = None  # n rows: a text run's unconditional branch of guidance
    prompts: Optional[List[str]] = None  # a text run: sample i's prompt
    per_prompt: Optional[int] = None  # a text run: samples in each prompt's group (a grid row)
    prompt_tag: str = ""  # a text run's prompts asked for, in a file name

    @property
    def sampler(self) -> str:
        return self.spec.name

    def tag(self, seed: Optional[int] = None) -> str:
        """A file-name stem, e.g. 'ddim_50steps_seed0', 'dpmpp_2m_karras_20steps_seed0_class3_guidance2'."""
        ts = f"_{self.step_schedule}" if self.step_schedule else ""
        return f"{self.sampler}{ts}_{self.steps}steps_seed{self.seed if seed is None else seed}{self.condition_tag()}"

    def condition_tag(self) -> str:
        return self.prompt_tag + condition_tag(self.label, self.guidance)

    def describe(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.options.items() if k in ("variance", "eta", "spacing")
                        or (k == "timesteps" and isinstance(v, str)))
        return f"{self.sampler}, {self.steps} steps{extra}"


def condition_tag(label: Optional[int], guidance: Optional[float]) -> str:
    """'_class3_guidance2' for a class label and a guidance scale, '' for neither (file names)."""
    cls = "" if label is None else f"_class{label}"
    return cls + ("" if guidance is None else f"_guidance{guidance:g}")


def check_steps(steps: int, most: int, span: str = "the model's num_timesteps") -> None:
    """OptionError about 'steps' unless 1 <= steps <= most (``span`` says what ``most`` counts)."""
    if not 1 <= steps <= most:
        raise OptionError("steps", f"{OPTION} must be between 1 and {most} ({span}), got {steps}")


# a run's own sampler where train.sample_sampler is null: DDIM for a DDPM; the flow ODE's Euler steps for a flow
PROCESS_SAMPLERS = {"ddpm": "ddim", "flow": "flow_euler"}


def own_sampler(cfg: Config) -> str:
    """The sampler of the run's own samples: train.sample_sampler, or where it is null its process's
    (:data:`PROCESS_SAMPLERS`)."""
    return cfg.train.sample_sampler or PROCESS_SAMPLERS[cfg.diffusion.process]


def default_sampler(cfg: Config) -> Tuple[str, Optional[int]]:
    """(sampler, steps or None) a run samples with when none is named and no recommendation exists:
    'student' for a distilled student, else the sampler and steps of the run's own samples
    (:func:`own_sampler` / train.sample_steps)."""
    if getattr(cfg, "distill", None) is not None and cfg.distill.teacher:
        return "student", None
    return own_sampler(cfg), cfg.train.sample_steps


def read_recommendation(run_dir) -> Optional[dict]:
    """RUN/recommended_samplers.json as a dict ({"by_nfe": {10: {"sampler": ..., "timesteps": ...}}, ...}) or None."""
    path = Path(run_dir) / RECOMMENDATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        by_nfe = {int(k): v for k, v in data["by_nfe"].items()}
        for entry in by_nfe.values():
            get_spec(entry["sampler"]).check_step_schedule(entry.get("timesteps"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        warnings.warn(f"ignoring {path}: {type(e).__name__}: {e}; run ddpm bench samplers {run_dir} again")
        return None
    return {**data, "by_nfe": by_nfe}


def recommended_sampler(run: Run, steps: Optional[int] = None,
                        step_schedule: Optional[str] = None) -> Optional[tuple]:
    """(sampler, step schedule, nfe) that ``ddpm bench samplers`` found best for this run, or None.

    With ``steps``: the recommendation for the largest benchmarked NFE <= steps (the smallest
    NFE if all are larger); without: the NFE whose best error was lowest (fewer NFE on a tie).
    A recommendation that cannot use the caller's ``step_schedule`` is not taken.
    """
    rec = read_recommendation(run.dir) if run.dir is not None else None
    if not rec or not rec["by_nfe"]:
        return None
    by = rec["by_nfe"]
    if steps is None:
        nfe = min(by, key=lambda k: (by[k].get("error_ratio", float("inf")), k))
    else:
        nfe = max((k for k in by if k <= steps), default=min(by))
    entry = by[nfe]
    if step_schedule is not None and step_schedule not in get_spec(entry["sampler"]).step_schedules:
        return None
    return entry["sampler"], entry.get("timesteps"), nfe


def run_guidance(run: Run, guidance: Optional[float], log: Callable[[str], None] = print) -> Optional[float]:
    """``guidance``, or where it is None the conditional (or text) run's train.sample_guidance (said in one line)."""
    if guidance is None and (run.num_classes or run.is_text) and run.cfg.train.sample_guidance is not None:
        guidance = float(run.cfg.train.sample_guidance)
        log(f"guidance {guidance:g}: the run's train.sample_guidance (a guidance scale overrides it; 0: the "
            "unconditional model)")
    return guidance


def guide(run: Run, net: nn.Module, n: int, label: Optional[int], guidance: Optional[float]) -> tuple:
    """(model, labels) of :func:`~ddpmlab.samplers.guidance.conditioning` for ``n`` samples of class
    ``label`` (an index, checked) with ``guidance``; an unusable scale is an OptionError about 'guidance'."""
    return conditioning(net, n, label, guidance, run.cfg.train.label_dropout)


def choose_sampler(run: Run, request: SamplingRequest, log: Callable[[str], None] = print) -> tuple:
    """(sampler, steps or None, step schedule or None) of ``request`` on ``run``: the named sampler, else the
    run's recommendation, else its own sampler and steps (steps and step schedule asked for are kept)."""
    sampler, steps, schedule = request.sampler, request.steps, request.step_schedule
    if sampler is not None:
        return sampler, steps, schedule
    rec = recommended_sampler(run, steps, schedule)
    if rec is not None:  # what `ddpm bench samplers RUN` found best for this run
        sampler, schedule, steps = rec[0], schedule or rec[1], rec[2] if steps is None else steps
        log(f"sampler: {sampler}{' with the ' + schedule + ' step schedule' if schedule else ''}, {steps} steps, as "
            f"recommended by ddpm bench samplers ({run.dir / RECOMMENDATION_FILE}; name a sampler to override)")
        return sampler, steps, schedule
    sampler, own_steps = default_sampler(run.cfg)
    if own_steps is not None:
        steps = own_steps if steps is None else steps
        log(f"sampler: {sampler}, {steps} steps: the run's train.sample_sampler (name a sampler to override)")
    return sampler, steps, schedule


def plan_request(run: Run, request: SamplingRequest, log: Callable[[str], None] = print) -> SamplingPlan:
    """The sampler call ``request`` asks for on ``run``, every rule in one place (see :class:`SamplingRequest`).

    Fitting the ``optimized`` step schedule to the model is the one slow part; it is a step of its
    own (:func:`~ddpmlab.samplers.registry.fit_step_schedule`), said in ``log`` when it runs.
    """
    request.check()
    sampler, steps, schedule = choose_sampler(run, request, log)
    spec = get_spec(sampler)
    spec.check_step_schedule(schedule)
    start = run.T if request.img2img_t0 is None else request.img2img_t0
    student = _student_options(run, steps, schedule) if spec.name == "student" else {}
    steps = student.pop("steps", steps)
    if request.steps is None and steps is not None:  # the run's steps: at most the timesteps from t0 down
        steps = min(steps, start)
    steps = spec.steps_for(start, steps)
    check_steps(steps, start, "the model's num_timesteps" if request.img2img_t0 is None else
                "the timesteps from t0 down")
    options = {**_sampler_options(run, spec, request.options), **student}
    if run.is_text:
        model, labels, label, guidance, text = _text_conditioning(run, request, log)
        extra = dict(cond=text.cond, uncond=text.uncond, prompts=text.prompts, per_prompt=text.per_prompt,
                     prompt_tag=text.tag, n=len(text.prompts))
    else:
        check_prompts(run, request.prompts, request.negative_prompt)
        model, labels, label, guidance, cond = _conditioning(run, request, log)
        extra = dict(cond=cond, n=request.n)
    options.update(_step_schedule_option(run, spec, schedule, steps, model, labels, request.seed, log))
    return SamplingPlan(spec, steps, options, model, labels, schedule, label, guidance, seed=request.seed, **extra)


def _sampler_options(run: Run, spec: SamplerSpec, asked: Mapping[str, object]) -> dict:
    """The options asked for (None dropped), each one the sampler takes; ddpm's variance defaults to the run's,
    the flow samplers' shift to the run's diffusion.flow_shift."""
    given = {k: v for k, v in asked.items() if v is not None}
    spec.check_options(given)
    if "variance" in spec.options:
        given["variance"] = check_variance(given.get("variance", run.cfg.diffusion.variance))
    if "shift" in spec.options:
        given.setdefault("shift", run.cfg.diffusion.flow_shift)
    return given


def _student_options(run: Run, steps: Optional[int], schedule: Optional[str]) -> dict:
    """The student sampler's steps (its distilled steps unless ``steps``) and options on ``run``."""
    ds = run.cfg.distill
    if not ds.teacher:
        raise OptionError("sampler", f"{OPTION} student samples a distilled student (ddpm distill); "
                                     f"{run.dir or 'this run'} is a diffusion run: use ddim, dpmpp_2m, ...")
    if schedule is not None:
        raise OptionError("step_schedule", f"{OPTION}: the student sampler uses the grid it was distilled on; "
                                           "drop it")
    steps = ds.steps if steps is None else steps
    check_student_steps(ds.method, steps, ds.steps)
    return {"steps": steps, "method": ds.method, "distilled_steps": ds.steps, "sigma_data": ds.sigma_data,
            "rho": ds.rho}


def _conditioning(run: Run, request: SamplingRequest, log: Callable[[str], None]) -> tuple:
    """(model, labels, label, guidance, cond) of ``request``: its class (a name or an index), the run's
    guidance where it applies, classes cycled where asked, the conditioning bound to the network."""
    label = run.class_index(request.label)
    cond = _check_condition(run, request.cond, request.n)
    net = run.model if cond is None else bind_condition(run.model, cond)
    edit = request.img2img_t0 is not None
    guidance = request.guidance if edit and label is None else run_guidance(run, request.guidance, log)
    model, labels = guide(run, net, request.n, label, guidance)
    if labels is None and request.cycle_classes and run.num_classes and not edit:
        labels = torch.arange(request.n) % run.num_classes
    return model, labels, label, guidance, cond


def _text_conditioning(run: Run, request: SamplingRequest, log: Callable[[str], None]) -> tuple:
    """(model, labels, label, guidance, TextPlan) of ``request`` on a text run: n samples per prompt asked
    for (or the run's own prompts sharing n), guidance (the run's where none is asked for) towards the prompts
    from the empty or negative prompt, class labels beside the text where the run has classes."""
    if request.cond is not None:
        raise ConfigError(f"{run.dir or 'this run'} is a text-to-image run: it takes prompts, not a conditioning "
                          "image")
    if request.label is not None and not run.num_classes:
        raise OptionError("class", f"{OPTION} {request.label}: {run.dir or 'this run'} is a text-to-image run "
                                   f"without classes (model.num_classes is null); ask for it in words with "
                                   f"{mention('prompt')} \"...\"")
    label = run.class_index(request.label)
    guidance = run_guidance(run, request.guidance, log)
    if guidance is not None and guidance != 1.0 and run.cfg.text.caption_dropout <= 0:
        raise OptionError("guidance", f"{OPTION} needs a model trained with caption dropout (text.caption_dropout "
                                      f"> 0): this run never learned the empty prompt; use {OPTION} 1 or retrain")
    if request.negative_prompt is not None and guidance is None:
        raise OptionError("negative_prompt", f"{OPTION} {request.negative_prompt!r} acts through classifier-free "
                                             f"guidance: give a guidance scale too, e.g. {mention('guidance')} 5")
    text = plan_text(run, request.prompts, request.negative_prompt, request.n, guidance, log)
    n = len(text.prompts)
    labels = None
    if label is not None:
        labels = torch.full((n,), label, dtype=torch.long)
    elif request.cycle_classes and run.num_classes and request.img2img_t0 is None:
        labels = torch.arange(n) % run.num_classes
    model = (bind_condition(run.model, text.cond) if text.uncond is None
             else TextGuidance(run.model, text.cond, text.uncond, guidance))
    return model, labels, label, guidance, text


def condition_shape(run: Run) -> tuple:
    """The shape of one sample's conditioning: (C, H, W) for super-resolution (the image size), (C * n_mels,
    1 + L // hop) for a vocoder (the log-mel spectrogram of a clip of the run's data.length)."""
    if run.cfg.model.condition == "mel":
        d = run.cfg.data
        return (run.shape[0] * d.n_mels, 1 + run.shape[-1] // d.hop_length)
    return tuple(run.shape)


def _check_condition(run: Run, cond: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """``cond`` as (n, *condition_shape) for a conditioned run (one row is repeated n times); refused otherwise."""
    kind, name = run.cfg.model.condition, run.dir or "RUN"
    if cond is None:
        if kind == "mel":
            raise ConfigError(f"{run.dir or 'this run'} is a vocoder (model.condition=mel): it re-synthesises a "
                              f"recording from its mel spectrogram; use `ddpm vocode {name} --audio in.wav`")
        if kind != "none":
            raise ConfigError(f"{run.dir or 'this run'} is a super-resolution run (model.condition={kind}): it "
                              f"samples from a low-res picture; use `ddpm upscale {name} --image low.png`")
        return None
    if kind == "none":
        raise ConfigError(f"{run.dir or 'this run'} is not conditioned (model.condition=none): it takes no "
                          "conditioning image or spectrogram")
    shape = condition_shape(run)
    if cond.ndim != 1 + len(shape) or cond.shape[0] not in (1, n) or tuple(cond.shape[1:]) != shape:
        raise ConfigError(f"the conditioning has shape {tuple(cond.shape)}; this run needs ({n} or 1, "
                          f"{', '.join(map(str, shape))}) for {n} samples")
    return cond.expand(n, *cond.shape[1:]).float().cpu()


def _step_schedule_option(run: Run, spec: SamplerSpec, name: Optional[str], steps: int, model, labels,
                          seed: int, log: Callable[[str], None]) -> dict:
    """The sampler's keyword for step schedule ``name`` ({} for its own); 'optimized' is fitted first."""
    if name != "optimized":
        return spec.schedule_option(name)
    log(f"fitting the {steps}-NFE 'optimized' step schedule of {spec.name} to this model on calibration noise ...")
    ts = fit_step_schedule(spec, model, run.schedule, run.shape, steps, prediction=run.cfg.diffusion.prediction,
                           clip_x0=run.clip_x0, device=run.device, labels=labels, seed=seed)
    log("timesteps: " + ", ".join(f"{t:.1f}" for t in ts.tolist()))
    return {"timesteps": ts}
