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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ddpmlab.data import data_shape
from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.toy import sliced_wasserstein
from ddpmlab.io.checkpoint import load_model
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.registry import SAMPLERS, check_timesteps_name, get_sampler
from ddpmlab.samplers.steps import optimize_timesteps

DEFAULT_NFE = (5, 10, 20, 50)
DEFAULT_SAMPLERS = ("ddim", "euler", "heun", "pc", "dpmpp_2m", "dpmpp_3m", "unipc",
                    "dpmpp_3m:optimized", "unipc:optimized")


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
class SamplerSpec:
    """``name`` or ``name:timesteps`` (e.g. ``unipc:optimized``) as given on the command line."""

    name: str
    timesteps: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "SamplerSpec":
        name, _, ts = text.strip().partition(":")
        get_sampler(name)
        check_timesteps_name(name, ts or None, where=f"--samplers {text.strip()}")
        return cls(name, ts or None)

    @property
    def label(self) -> str:
        return self.name + (f":{self.timesteps}" if self.timesteps else "")

    def options(self) -> dict:
        if self.timesteps is None:
            return {}
        return {"spacing": self.timesteps} if self.name in ("ddim", "ddpm") else {"timesteps": self.timesteps}


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
    try:
        nfes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--nfe must be a comma-separated list of integers, got '{text}'") from None
    if not nfes or nfes[0] < 1:
        raise ConfigError(f"--nfe values must be >= 1, got '{text}'")
    return nfes


SampleFn = Callable[[SamplerSpec, int, dict], torch.Tensor]


def run_bench(target: str, sample: SampleFn, reference: torch.Tensor, floor_sets: Sequence[torch.Tensor],
              specs: Sequence[SamplerSpec], nfes: Sequence[int], calibrate: Optional[Callable] = None,
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
    def calibrate(spec: SamplerSpec, nfe: int) -> torch.Tensor:
        return optimize_timesteps(predict, schedule, SAMPLERS[spec.name], nfe, x_cal)

    return calibrate


def bench_analytic(name: str, specs: Sequence[SamplerSpec], nfes: Sequence[int], n: int = 20000,
                   seed: int = 0, floor_pairs: int = 8, log: Callable[[str], None] = print) -> BenchResult:
    """Samplers driven by the exact eps* of an analytic mixture, against exact samples."""
    if name not in ANALYTIC_TARGETS:
        raise ConfigError(f"--analytic: unknown target '{name}'; choose one of {', '.join(ANALYTIC_TARGETS)}")
    mix = ANALYTIC_TARGETS[name]()
    schedule = NoiseSchedule.make("linear", 1000)
    predict = ModelPredictor(ExactDenoiser(mix, schedule), schedule, "eps")
    x_T = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_cal = torch.randn(min(n, 1000), mix.dim, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    reference = mix.sample(n, torch.Generator().manual_seed(seed + 1))
    floor_sets = [mix.sample(n, torch.Generator().manual_seed(seed + 100 + k)) for k in range(floor_pairs)]

    def sample(spec: SamplerSpec, nfe: int, options: dict) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 4)
        return SAMPLERS[spec.name](predict, schedule, x_T, nfe, generator=g, **options)

    log(f"{name}: {n} samples, exact eps*, linear betas T=1000; error / floor per NFE {list(nfes)}")
    return run_bench(name, sample, reference, floor_sets, specs, nfes, _calibrator(predict, schedule, x_cal), log)


def bench_run(run_dir, specs: Sequence[SamplerSpec], nfes: Sequence[int], n: int = 256, seed: int = 0,
              reference_steps: int = 1000, batch_size: int = 256, device: str = "cpu", weights: str = "ema",
              log: Callable[[str], None] = print) -> BenchResult:
    """Samplers on a trained run against a ``reference_steps`` ancestral run from the same noise seeds."""
    cfg, model = load_model(run_dir, weights, device)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    shape = data_shape(cfg)
    clip = 1.0 if len(shape) == 3 else None
    if not 1 <= reference_steps <= schedule.num_timesteps:
        raise ConfigError(f"--reference-steps must be between 1 and {schedule.num_timesteps}, got {reference_steps}")
    common = dict(prediction=cfg.diffusion.prediction, clip_x0=clip, batch_size=batch_size, device=device,
                  progress=False)
    log(f"reference: {n} samples, ddpm with {reference_steps} steps (twice, for the floor)")
    reference = generate(model, schedule, shape, n, sampler="ddpm", steps=reference_steps, seed=seed, **common)
    floor_set = generate(model, schedule, shape, n, sampler="ddpm", steps=reference_steps, seed=seed + 10_000,
                         **common)
    predict = ModelPredictor(model, schedule, cfg.diffusion.prediction, clip_x0=clip)
    gen = torch.Generator().manual_seed(seed + 20_000)
    x_cal = torch.randn((min(n, batch_size), *shape), generator=gen).to(device)

    def sample(spec: SamplerSpec, nfe: int, options: dict) -> torch.Tensor:
        return generate(model, schedule, shape, n, sampler=spec.name, steps=nfe, seed=seed, **common, **options)

    log(f"{run_dir}: error / floor per NFE {list(nfes)}")
    return run_bench(str(run_dir), sample, reference, [floor_set], specs, nfes,
                     _calibrator(predict, schedule, x_cal), log)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for label, errs in res.errors.items():
        ax.plot(res.nfes, [errs[k] for k in res.nfes], marker="o", label=label)
    ax.axhline(res.floor, color="0.4", ls="--", lw=1, label="two-sample floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(res.nfes, [str(k) for k in res.nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("sliced W2 to reference")
    ax.set_title(f"sampler error vs NFE: {Path(res.target).name}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
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
