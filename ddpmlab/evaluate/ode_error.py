"""The ODE error of a deterministic solver: per-sample distance to the exact probability-flow solution.

A deterministic solver started from x_T approximates one map x_T -> x_0, the solution of the
probability-flow ODE (Song et al. 2021, Eq. 13).  Its error is measured here sample by sample
against a reference solution from the same x_T: :func:`reference_flow`, classical RK4 in
lambda = -log sigma (uniform steps) on dx/dlambda = D(x; sigma) - x in the variance-exploding
view x = x_t / sqrt(abar_t), from sigma(T-1) down to sigma(0), then the x0 prediction there
(the last step of every solver; the model is defined on [sigma(0), sigma(T-1)] only).  Unlike a
distance between sample sets this has no sampling floor: the error falls as NFE^-p for a solver
of order p, and the slope on log-log axes is its empirical order of convergence.

:func:`ode_errors` measures ddpmlab's solvers (``name`` or ``name:timesteps``) and, when
diffusers is installed, its schedulers (:func:`diffusers_flow`) driven by the same model from
the same x_T.  ``benchmarks/ode_error.py`` runs it on Gaussian mixtures with exact scores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ddpmlab.diffusion.schedules import NoiseSchedule, log_sigmas, t_of_sigma
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.bench import BenchEntry
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.samplers.solvers import ve_denoiser

DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")


@torch.no_grad()
def reference_flow(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """The probability-flow endpoint from x_T (at t = T-1): ``steps`` RK4 steps in lambda, then D at sigma(0).

    x_T: (B, ...) standard normal -> x_0 (B, ...); 4 * steps + 1 model evaluations.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"reference steps must be a positive integer, got {steps!r}")
    ls = log_sigmas(schedule)
    lam0, lam1 = -float(ls[-1]), -float(ls[0])
    denoise = ve_denoiser(predict)

    def f(x: torch.Tensor, lam: float) -> torch.Tensor:  # dx/dlambda = D - x
        sigma = math.exp(-lam)
        return denoise(x, sigma, t_of_sigma(schedule, torch.tensor(sigma, dtype=torch.float64))) - x

    x = x_T.to(torch.float64) * math.sqrt(1.0 + math.exp(-2 * lam0))
    h = (lam1 - lam0) / steps
    for i in range(steps):
        lam = lam0 + i * h
        k1 = f(x, lam)
        k2 = f(x + h / 2 * k1, lam + h / 2)
        k3 = f(x + h / 2 * k2, lam + h / 2)
        k4 = f(x + h * k3, lam + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    sigma_end = math.exp(-lam1)
    return denoise(x, sigma_end, t_of_sigma(schedule, torch.tensor(sigma_end, dtype=torch.float64)))


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square over samples and coordinates of x - ref (both (B, ...))."""
    return float((x.to(torch.float64) - ref.to(torch.float64)).pow(2).mean().sqrt())


def convergence_order(nfes: Sequence[int], errors: Sequence[float]) -> float:
    """Empirical order p of err ~ NFE^-p: minus the least-squares slope of log err against log NFE."""
    pts = [(math.log(k), math.log(e)) for k, e in zip(nfes, errors) if e is not None and e > 0 and math.isfinite(e)]
    if len(pts) < 2:
        return math.nan
    a = np.array(pts)
    return float(-np.polyfit(a[:, 0], a[:, 1], 1)[0])


# --- diffusers' schedulers on the same model ----------------------------------------------------

DIFFUSERS_SCHEDULERS: Dict[str, tuple] = {
    "diffusers DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "diffusers DPM++2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "diffusers DPM++2M karras": ("DPMSolverMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True}),
    "diffusers UniPC": ("UniPCMultistepScheduler", {}),
    "diffusers Euler": ("EulerDiscreteScheduler", {}),
    "diffusers Heun": ("HeunDiscreteScheduler", {}),
}


def _their_time(schedule: NoiseSchedule, t) -> torch.Tensor:
    """The training time at which a diffusers scheduler's timestep t has its noise level.

    Integer t is itself; fractional t (Euler/Heun discrete) has sigma interpolated linearly in
    sigma between the training levels, as those schedulers compute it, and the model is
    evaluated at that sigma (ddpmlab's fractional t interpolates log sigma instead)."""
    t = float(t)
    if t == round(t):
        return torch.tensor(int(round(t)))
    table = log_sigmas(schedule).exp().numpy()
    sigma = float(np.interp(t, np.arange(len(table)), table))
    return t_of_sigma(schedule, torch.tensor(sigma, dtype=torch.float64))


@torch.no_grad()
def diffusers_flow(name: str, model: Callable, schedule: NoiseSchedule, x_T: torch.Tensor, nfe: int) -> torch.Tensor:
    """x_0 of diffusers scheduler ``name`` (a key of DIFFUSERS_SCHEDULERS) from x_T with ``nfe`` evaluations
    of the eps-predicting ``model(x_t, t)`` (Heun: (nfe + 1) // 2 levels, 2 levels - 1 evaluations)."""
    try:
        import diffusers
    except ImportError:
        raise DDPMError("comparing with diffusers' schedulers needs diffusers: pip install diffusers") from None
    cls_name, config = DIFFUSERS_SCHEDULERS[name]
    sched = getattr(diffusers, cls_name)(num_train_timesteps=schedule.num_timesteps,
                                         trained_betas=schedule.betas.numpy(), **config)
    sched.set_timesteps((nfe + 1) // 2 if cls_name == "HeunDiscreteScheduler" else nfe)
    x = x_T.to(torch.float64).clone()
    if float(sched.init_noise_sigma) > 1.0:  # sigma-based schedulers work on x_t / sqrt(abar): the same x_T
        x = x * math.sqrt(1.0 + float(sched.sigmas[0]) ** 2)
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(x, t), _their_time(schedule, t))
        x = sched.step(eps, t, x).prev_sample
    return x.to(torch.float64)


# --- the table ----------------------------------------------------------------------------------

@dataclass
class OdeErrorResult:
    """errors[label][nfe] = RMSE to the reference flow; ``reference_gap``: RMSE between the reference
    with ``reference_steps`` and with twice as many (its own error)."""

    target: str
    dim: int
    n: int
    nfes: List[int]
    reference_steps: int
    reference_gap: float
    errors: Dict[str, Dict[int, float]] = field(default_factory=dict)

    def order(self, label: str, min_nfe: int = 0) -> float:
        ks = [k for k in self.nfes if k >= min_nfe and k in self.errors[label]]
        return convergence_order(ks, [self.errors[label][k] for k in ks])


def ode_errors(predict, schedule: NoiseSchedule, x_T: torch.Tensor, entries: Sequence[str], nfes: Sequence[int], *,
               model: Optional[Callable] = None, diffusers: Sequence[str] = (), reference_steps: int = 1000,
               check_reference: bool = True, calibrate: Optional[Callable] = None, target: str = "",
               optimized_max_nfe: Optional[int] = None, log: Callable[[str], None] = print) -> OdeErrorResult:
    """RMSE to the exact flow for every solver entry (``name`` or ``name:timesteps``) and NFE.

    ``model``: the bare eps-model for diffusers' schedulers (names of DIFFUSERS_SCHEDULERS);
    ``calibrate(name, nfe) -> timesteps`` serves ``:optimized`` entries (skipped above
    ``optimized_max_nfe``).  The reference is checked against 2 x ``reference_steps`` steps.
    """
    parsed = [BenchEntry.parse(e) for e in entries]
    for e in parsed:
        if e.name not in DETERMINISTIC:
            raise ConfigError(f"entries {e.label}: the ODE error needs a deterministic solver "
                              f"({', '.join(DETERMINISTIC)})")
    ref = reference_flow(predict, schedule, x_T, reference_steps)
    gap = rmse(ref, reference_flow(predict, schedule, x_T, 2 * reference_steps)) if check_reference else math.nan
    log(f"{target}: reference RK4 {reference_steps} steps; RMSE to {2 * reference_steps} steps: {gap:.2e}")
    res = OdeErrorResult(target, int(x_T[0].numel()), len(x_T), sorted(nfes), reference_steps, gap)
    for e in parsed:
        res.errors[e.label] = {}
        for k in res.nfes:
            options = e.options()
            if e.timesteps == "optimized":
                if calibrate is None or (optimized_max_nfe is not None and k > optimized_max_nfe):
                    continue
                options["timesteps"] = calibrate(e.name, k)
            res.errors[e.label][k] = rmse(SAMPLERS[e.name](predict, schedule, x_T, k, **options), ref)
        log(f"  {e.label:<26}" + " ".join(f"{res.errors[e.label].get(k, math.nan):9.2e}" for k in res.nfes))
    for name in diffusers:
        res.errors[name] = {k: rmse(diffusers_flow(name, model, schedule, x_T, k), ref) for k in res.nfes}
        log(f"  {name:<26}" + " ".join(f"{res.errors[name][k]:9.2e}" for k in res.nfes))
    return res


def markdown(res: OdeErrorResult, min_nfe: int = 20) -> str:
    """One row per solver: RMSE per NFE (best per column in bold), the order over NFE >= min_nfe and overall."""
    head = ("| solver | " + " | ".join(f"NFE {k}" for k in res.nfes) + f" | order (NFE >= {min_nfe}) | order (all) |")
    lines = [head, "|---|" + "---:|" * (len(res.nfes) + 2)]
    best = {k: min((e[k] for e in res.errors.values() if k in e), default=math.nan) for k in res.nfes}
    for label, errs in res.errors.items():
        cells = ["-" if k not in errs else (f"**{errs[k]:.2e}**" if errs[k] == best[k] else f"{errs[k]:.2e}")
                 for k in res.nfes]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {res.order(label, min_nfe):.2f} | "
                     f"{res.order(label):.2f} |")
    lines.append(f"\nRMSE per coordinate to the probability-flow solution from the same x_T ({res.n} samples, "
                 f"{res.dim}-D, target {res.target}); reference: RK4 in log-sigma with {res.reference_steps} "
                 f"steps, {res.reference_gap:.1e} from {2 * res.reference_steps} steps.")
    return "\n".join(lines) + "\n"


def plot(res: OdeErrorResult, path: Path, labels: Optional[Sequence[str]] = None) -> Path:
    """Error vs NFE on log axes (``labels``: the rows to draw, default all)."""
    from matplotlib.figure import Figure  # matplotlib only when a plot is drawn
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(6.5, 4.8), dpi=110)
    ax = fig.subplots()
    for label in labels or list(res.errors):
        ks = [k for k in res.nfes if k in res.errors[label]]
        ax.plot(ks, [res.errors[label][k] for k in ks], marker="o", ms=3, ls="--" if "diffusers" in label else "-",
                label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(res.nfes, [str(k) for k in res.nfes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("RMSE to the exact ODE solution")
    ax.set_title(f"ODE error vs NFE: {res.target}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def to_json(res: OdeErrorResult) -> str:
    return json.dumps({"target": res.target, "dim": res.dim, "n": res.n, "nfe": res.nfes,
                       "reference_steps": res.reference_steps, "reference_gap": res.reference_gap,
                       "errors": res.errors, "order": {label: res.order(label, 20) for label in res.errors}}, indent=1)
