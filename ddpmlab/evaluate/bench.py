"""``ddpm bench samplers``: how close each sampler gets to the target distribution per NFE.

Distance: sliced Wasserstein-2 (Rabin et al. 2011; SW_2^2 = E_theta W_2^2 of the 1-D
projections) between the sampler's output and a reference sample set.  It needs no feature
network, works in any dimension, and has a known floor: two independent sample sets of the
same distribution are at a distance > 0, measured here with the same projections, and every
error is reported as a multiple of that floor (1.0 = indistinguishable at this n).

- Analytic targets (``mixture2d``, ``mixture64d``): the model is the exact noise predictor of a
  Gaussian mixture (:class:`~ddpmlab.diffusion.analytic.ExactDenoiser`), the reference exact samples.
- A trained run: the reference is a ``reference_steps`` ancestral (DDPM) run of the same model
  from the same noise seeds, the floor the distance of a second ancestral run with other seeds.
  Deterministic solvers converge to the model's probability-flow ODE, which matches its
  ancestral distribution only as well as the model matches the data: a gap that stays as NFE
  grows measures that, not solver error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ddpmlab.atomic import atomic_write_text
from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import OPTION, ConfigError, DDPMError, OptionError
from ddpmlab.evaluate.toy import sliced_wasserstein
from ddpmlab.runs import RECOMMENDATION_FILE, SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS, get_spec
from ddpmlab.samplers.steps import optimize_timesteps

DEFAULT_NFE = (5, 10, 20, 50)
DEFAULT_SAMPLERS = ("ddim", "euler", "heun", "pc", "dpmpp_2m", "dpmpp_3m", "unipc",
                    "dpmpp_3m:optimized", "unipc:optimized", "dpmpp_2m_sde", "restart", "edm")


def mixture2d() -> GaussianMixture:
    """8 modes on the unit circle, std 0.1, weights 1:2:...:8 (the unequal weights test mode coverage)."""
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    return GaussianMixture(torch.stack([ang.cos(), ang.sin()], 1), 0.1, torch.arange(1, 9, dtype=torch.float64))


def mixture64d() -> GaussianMixture:
    """16 modes with means uniform in [-1, 1]^64, stds in [0.1, 0.3], weights in [0.5, 1.5] (seed 0)."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(16, 64, generator=g, dtype=torch.float64) * 2 - 1
    stds = 0.1 + 0.2 * torch.rand(16, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, 0.5 + torch.rand(16, generator=g, dtype=torch.float64))


ANALYTIC_TARGETS: Dict[str, Callable[[], GaussianMixture]] = {"mixture2d": mixture2d, "mixture64d": mixture64d}


def sliced_w2(x: torch.Tensor, y: torch.Tensor, projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between equal-size sample sets x, y: (N, D), float64.

    The directions depend only on ``seed`` and D, so distances computed with one seed are comparable.
    """
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if x.shape != y.shape:
        raise DDPMError(f"sliced W2 needs sample sets of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return sliced_wasserstein(x, y, projections, generator=torch.Generator().manual_seed(seed))


@dataclass
class BenchEntry:
    """One row of the benchmark: ``name`` or ``name:timesteps`` (e.g. ``unipc:optimized``)."""

    name: str
    timesteps: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "BenchEntry":
        """``name`` or ``name:timesteps``; a bad one is an OptionError about 'samplers'."""
        name, _, ts = text.strip().partition(":")
        try:
            get_spec(name).check_step_schedule(ts or None)
        except OptionError as e:  # about an entry of the list: named as '<the list's option> <entry>'
            raise OptionError("samplers", e.named({e.option: f"{OPTION} {text.strip()}"})) from None
        return cls(name, ts or None)

    @property
    def label(self) -> str:
        return self.name + (f":{self.timesteps}" if self.timesteps else "")

    def options(self) -> dict:
        return get_spec(self.name).schedule_option(self.timesteps)


@dataclass
class BenchResult:
    """errors[label][nfe] = SW2 distance; floor = SW2 between two independent reference sets."""

    target: str
    n: int
    floor: float
    nfes: List[int]
    errors: Dict[str, Dict[int, float]] = field(default_factory=dict)

    def ratio(self, label: str, nfe: int) -> float:
        return self.errors[label][nfe] / self.floor


def parse_nfes(text: str) -> List[int]:
    """'5,10,20' as [5, 10, 20]; a bad list is an OptionError about 'nfe'."""
    try:
        nfes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise OptionError("nfe", f"{OPTION} must be a comma-separated list of integers, got '{text}'") from None
    if not nfes or nfes[0] < 1:
        raise OptionError("nfe", f"{OPTION} values must be >= 1, got '{text}'")
    return nfes


SampleFn = Callable[[BenchEntry, int, dict], torch.Tensor]


def run_bench(target: str, sample: SampleFn, reference: torch.Tensor, floor_sets: Sequence[torch.Tensor],
              specs: Sequence[BenchEntry], nfes: Sequence[int], calibrate: Optional[Callable] = None,
              log: Callable[[str], None] = print) -> BenchResult:
    """Distances for every spec and NFE.  sample(spec, nfe, options) -> (n, ...) samples;
    calibrate(spec, nfe) -> timesteps tensor, for the ``optimized`` schedule.  The floor is the mean
    distance of the independent sets ``floor_sets`` to the reference (one estimate varies by ~30 %)."""
    floor = sum(sliced_w2(f, reference) for f in floor_sets) / len(floor_sets)
    res = BenchResult(target, len(reference), floor, list(nfes))
    for spec in specs:
        res.errors[spec.label] = {}
        for nfe in nfes:
            options = spec.options()
            if spec.timesteps == "optimized":
                if calibrate is None:
                    raise ConfigError("timesteps 'optimized' needs a calibration model")
                options["timesteps"] = calibrate(spec, nfe)
            res.errors[spec.label][nfe] = sliced_w2(sample(spec, nfe, options), reference)
        log(f"  {spec.label:<22}" + " ".join(f"{res.ratio(spec.label, k):8.2f}" for k in nfes))
    return res


def _calibrator(predict, schedule: NoiseSchedule, x_cal: torch.Tensor) -> Callable:
    def calibrate(spec: BenchEntry, nfe: int) -> torch.Tensor:
        return optimize_timesteps(predict, schedule, SAMPLERS[spec.name], nfe, x_cal)

    return calibrate


def bench_analytic(name: str, specs: Sequence[BenchEntry], nfes: Sequence[int], n: int = 20000,
                   seed: int = 0, floor_pairs: int = 8, log: Callable[[str], None] = print) -> BenchResult:
    """Samplers driven by the exact eps* of an analytic mixture, against exact samples."""
    if name not in ANALYTIC_TARGETS:
        raise ConfigError(f"unknown analytic target '{name}'; choose one of {', '.join(ANALYTIC_TARGETS)}")
    mix = ANALYTIC_TARGETS[name]()
    schedule = NoiseSchedule.make("linear", 1000)
    predict = ModelPredictor(ExactDenoiser(mix, schedule), schedule, "eps")
    x_T = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_cal = torch.randn(min(n, 1000), mix.dim, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    reference = mix.sample(n, torch.Generator().manual_seed(seed + 1))
    floor_sets = [mix.sample(n, torch.Generator().manual_seed(seed + 100 + k)) for k in range(floor_pairs)]

    def sample(spec: BenchEntry, nfe: int, options: dict) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 4)
        return SAMPLERS[spec.name](predict, schedule, x_T, nfe, generator=g, **options)

    log(f"{name}: {n} samples, exact eps*, linear betas T=1000; error / floor per NFE {list(nfes)}")
    return run_bench(name, sample, reference, floor_sets, specs, nfes, _calibrator(predict, schedule, x_cal), log)


def bench_run(run_dir, specs: Sequence[BenchEntry], nfes: Sequence[int], n: int = 256, seed: int = 0,
              reference_steps: int = 1000, batch_size: int = 256, device="auto", weights: str = "ema",
              log: Callable[[str], None] = print) -> BenchResult:
    """Samplers on a trained run against a ``reference_steps`` ancestral run from the same noise seeds.

    Every sampler call is planned by the run layer (the run's own variance and guidance, class
    labels of a conditional run cycling through the classes).
    """
    run = load_run(run_dir, weights, device)

    def plan(sampler: str, steps: int):
        return plan_request(run, SamplingRequest(sampler, steps, n=n, seed=seed), log=lambda m: None)

    def draw(p, draw_seed: int, options: Optional[dict] = None) -> torch.Tensor:
        p = dataclasses.replace(p, options={**p.options, **(options or {})})
        return draw_samples(run, p, n, seed=draw_seed, batch_size=batch_size, progress=False)

    try:
        ref_plan = plan("ddpm", reference_steps)
    except OptionError as e:  # a bad reference_steps is named as such in the message
        raise e if e.option != "steps" else OptionError("reference_steps", e.template) from None
    log(f"reference: {n} samples, ddpm with {reference_steps} steps (twice, for the floor)")
    reference = draw(ref_plan, seed)
    floor_set = draw(ref_plan, seed + 10_000)
    predict = ModelPredictor(run.model, run.schedule, run.cfg.diffusion.prediction, clip_x0=run.clip_x0)
    gen = torch.Generator().manual_seed(seed + 20_000)
    x_cal = torch.randn((min(n, batch_size), *run.shape), generator=gen).to(run.device)

    def sample(spec: BenchEntry, nfe: int, options: dict) -> torch.Tensor:
        return draw(plan(spec.name, nfe), seed, options)

    log(f"{run.dir}: error / floor per NFE {list(nfes)}")
    return run_bench(str(run.dir), sample, reference, [floor_set], specs, nfes,
                     _calibrator(predict, run.schedule, x_cal), log)


def markdown_table(res: BenchResult) -> str:
    """Rows: samplers; columns: NFE; cells: SW2 error as a multiple of the floor (best per column in bold)."""
    head = "| sampler | " + " | ".join(f"NFE {k}" for k in res.nfes) + " |"
    lines = [head, "|---|" + "---:|" * len(res.nfes)]
    best = {k: min(res.ratio(s, k) for s in res.errors) for k in res.nfes}
    for label in res.errors:
        cells = []
        for k in res.nfes:
            r = res.ratio(label, k)
            cells.append(f"**{r:.2f}**" if r == best[k] else f"{r:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nSliced W2 distance to {res.n} reference samples, divided by the two-sample floor "
                 f"{res.floor:.4g} (mean distance of independent reference sets; target: {res.target}).")
    return "\n".join(lines) + "\n"


def plot(res: BenchResult, path: Path) -> Path:
    fig = Figure(figsize=(6, 4.5), dpi=110)
    ax = fig.subplots()
    for label, errs in res.errors.items():
        ax.plot(res.nfes, [errs[k] for k in res.nfes], marker="o", label=label)
    ax.axhline(res.floor, color="0.4", ls="--", lw=1, label="two-sample floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(res.nfes, [str(k) for k in res.nfes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("sliced W2 to reference")
    ax.set_title(f"sampler error vs NFE: {Path(res.target).name}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save(res: BenchResult, out_dir: Path) -> List[Path]:
    """sampler_bench.md, sampler_bench.png and sampler_bench.json in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "sampler_bench.md"
    md.write_text(markdown_table(res))
    js = out_dir / "sampler_bench.json"
    js.write_text(json.dumps({"target": res.target, "n": res.n, "floor": res.floor, "nfe": res.nfes,
                              "errors": res.errors}, indent=1))
    return [md, plot(res, out_dir / "sampler_bench.png"), js]


def recommendation(res: BenchResult) -> dict:
    """The best sampler per NFE of a benchmark: {"by_nfe": {nfe: {"sampler", "timesteps", "error_ratio"}}, ...}."""
    by_nfe = {}
    for k in res.nfes:
        label = min(res.errors, key=lambda s: res.errors[s][k])
        entry = BenchEntry.parse(label)
        by_nfe[str(k)] = {"sampler": entry.name, "timesteps": entry.timesteps, "error_ratio": res.ratio(label, k)}
    return {"source": "ddpm bench samplers", "reference": res.target, "n": res.n, "floor": res.floor,
            "compared": list(res.errors), "by_nfe": by_nfe}


def save_recommendation(res: BenchResult, run_dir) -> Path:
    """RUN/recommended_samplers.json: what `ddpm sample RUN` uses when no --sampler is named."""
    path = Path(run_dir) / RECOMMENDATION_FILE
    atomic_write_text(path, json.dumps(recommendation(res), indent=1))  # never a half-written file
    return path
