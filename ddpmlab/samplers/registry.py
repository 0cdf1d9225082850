"""Samplers by name: one :class:`SamplerSpec` per sampler says what it takes.

``SAMPLER_SPECS["ddim"]`` holds the function, the options it accepts, how its step schedule
is given (``spacing=`` with the integer spacings of Ho et al. / DDIM, or ``timesteps=`` with
any schedule of :mod:`ddpmlab.samplers.steps`), whether it draws fresh noise, and its default
number of steps.  Every front end (command line, run layer, evaluation, benchmarks) asks
the spec instead of comparing sampler names.  ``SAMPLERS[name]`` is the bare function.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import OPTION, ConfigError, OptionError
from ddpmlab.samplers.ancestral import ddim, ddpm, diffwave_fast
from ddpmlab.samplers.base import ModelPredictor, with_threshold
from ddpmlab.samplers.flow import flow_euler, flow_heun, flow_midpoint, flow_sde
from ddpmlab.samplers.langevin import pc
from ddpmlab.samplers.solvers import dpmpp_2m, dpmpp_3m, euler, heun, unipc
from ddpmlab.samplers.steps import STEP_SCHEDULES, levels_for, optimize_timesteps
from ddpmlab.samplers.stochastic import dpmpp_2m_sde, edm, restart
from ddpmlab.samplers.student import student

INTEGER_SPACINGS = ("uniform", "leading", "trailing")  # what ddpm / ddim take as `spacing`
SPACING, TIMESTEPS = "spacing", "timesteps"  # the two ways a step schedule is passed


@dataclass(frozen=True)
class SamplerSpec:
    """What one sampler takes.

    ``schedule_kind``: SPACING (integer spacings, ``spacing=``) or TIMESTEPS (any step
    schedule, ``timesteps=``); ``options``: its other keyword options; ``stochastic``: it draws
    fresh noise (the one place this is written; an ``optimized`` step schedule is refused for
    it); ``default_steps``: None means every timestep of the schedule it runs on (T, or t0
    for image-to-image).
    """

    name: str
    fn: Callable
    schedule_kind: str
    options: Tuple[str, ...]
    stochastic: bool
    default_steps: Optional[int]
    summary: str

    def steps_for(self, n: int, steps: Optional[int] = None) -> int:
        """The steps to run on a schedule of ``n`` timesteps: ``steps``, or the default."""
        if steps is not None:
            return steps
        return n if self.default_steps is None else min(self.default_steps, n)

    def levels(self, steps: int, **options) -> int:
        """Noise levels (callbacks) of a run with ``steps`` model evaluations."""
        return levels_for(self.fn, steps, **options)

    @property
    def step_schedules(self) -> Tuple[str, ...]:
        return INTEGER_SPACINGS if self.schedule_kind == SPACING else tuple(STEP_SCHEDULES)

    def check_step_schedule(self, name: Optional[str]) -> None:
        """OptionError about 'step_schedule' unless ``name`` is a step schedule this sampler can use."""
        if name is None:
            return
        if name not in STEP_SCHEDULES:
            close = difflib.get_close_matches(name, list(STEP_SCHEDULES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise OptionError("step_schedule", f"{OPTION}: unknown schedule '{name}'{hint} (available: "
                                               f"{', '.join(STEP_SCHEDULES)})")
        if name == "optimized" and self.stochastic:
            raise OptionError("step_schedule", f"{OPTION}: 'optimized' is fitted to deterministic solvers; "
                                               f"{self.name} takes the other schedules")
        if name not in self.step_schedules:
            raise OptionError("step_schedule", f"{OPTION}: {self.name} takes {', '.join(self.step_schedules)}, "
                                               f"not '{name}'; for other step schedules use euler (DDIM on any "
                                               "schedule) or a higher-order solver")

    def schedule_option(self, name: Optional[str]) -> dict:
        """The keyword that gives this sampler step schedule ``name`` ({} for its own default)."""
        return {} if name is None else {self.schedule_kind: name}

    def check_options(self, options: dict) -> None:
        """OptionError about the first option this sampler does not take."""
        for key in options:
            if key not in self.options and key != self.schedule_kind:
                takes = ", ".join(self.options) or "no other options"
                raise OptionError(key, f"{OPTION} does not apply to sampler {self.name} (it takes: {takes})")


def _spec(fn: Callable, kind: str, options: Sequence[str], stochastic: bool, default_steps: Optional[int],
          summary: str) -> SamplerSpec:
    return SamplerSpec(fn.__name__, fn, kind, tuple(options), stochastic, default_steps, summary)


def _thresholding(fn: Callable, kind: str, options: Sequence[str], stochastic: bool, default_steps: Optional[int],
                  summary: str) -> SamplerSpec:
    """A spec whose sampler also takes ``threshold=p``: dynamic thresholding of x0 (base.with_threshold)."""
    return _spec(with_threshold(fn), kind, [*options, "threshold"], stochastic, default_steps, summary)


SAMPLER_SPECS: Dict[str, SamplerSpec] = {s.name: s for s in [
    _thresholding(ddpm, SPACING, ["variance"], True, None, "ancestral sampling, Ho et al. 2020, Alg. 2"),
    _thresholding(ddim, SPACING, ["eta"], False, 50, "DDIM, Song et al. 2021 (eta > 0 adds noise)"),
    _thresholding(diffwave_fast, TIMESTEPS, ["variance"], True, 6,
                  "DiffWave's fast sampling, Kong et al. 2021, App. B (ancestral steps on any step schedule; "
                  "default its 6 levels)"),
    _thresholding(dpmpp_2m, TIMESTEPS, ["lower_order_final"], False, 50, "DPM-Solver++(2M), Lu et al. 2022"),
    _thresholding(dpmpp_3m, TIMESTEPS, ["lower_order_final"], False, 50, "DPM-Solver++(3M)"),
    _thresholding(unipc, TIMESTEPS, ["order", "lower_order_final"], False, 50, "UniPC, Zhao et al. 2023"),
    _thresholding(euler, TIMESTEPS, ["s_churn", "s_tmin", "s_tmax", "s_noise"], False, 50,
                  "Euler, Karras et al. 2022"),
    _thresholding(heun, TIMESTEPS, ["s_churn", "s_tmin", "s_tmax", "s_noise"], False, 50,
                  "Heun, Karras et al. 2022, Alg. 2"),
    _thresholding(pc, TIMESTEPS, ["snr", "corrector_steps", "predictor"], True, 50,
                  "predictor-corrector with Langevin steps, Song et al. 2021"),
    _thresholding(dpmpp_2m_sde, TIMESTEPS, ["eta", "s_noise", "solver_type", "s_tmin", "s_tmax"], True, 50,
                  "DPM-Solver++(2M) SDE, Lu et al. 2022 (eta 0: dpmpp_2m)"),
    _thresholding(restart, TIMESTEPS, ["solver", "s_min", "s_max", "restarts", "restart_steps", "s_noise"], True, 50,
                  "Restart sampling, Xu et al. 2023 (Heun ODE with noise-and-re-solve intervals)"),
    _thresholding(edm, TIMESTEPS, ["s_churn", "s_tmin", "s_tmax", "s_noise"], True, 50,
                  "EDM stochastic sampler, Karras et al. 2022, Alg. 2 (churn on)"),
    _thresholding(flow_euler, TIMESTEPS, ["shift"], False, 50,
                  "Euler on the flow ODE dx/dt = v (Liu et al. 2023; SD3's sampler)"),
    _thresholding(flow_heun, TIMESTEPS, ["shift"], False, 50, "Heun's method on the flow ODE"),
    _thresholding(flow_midpoint, TIMESTEPS, ["shift"], False, 50, "the midpoint method on the flow ODE"),
    _thresholding(flow_sde, TIMESTEPS, ["shift", "eta"], True, 50,
                  "Euler-Maruyama on a reverse SDE with the flow's marginals (eta 0: flow_euler)"),
    _spec(student, SPACING, ["method", "distilled_steps", "sigma_data", "rho"], True, None,
          "a distilled few-step student (ddpm distill): progressive or consistency"),
]}
SAMPLERS: Dict[str, Callable] = {name: s.fn for name, s in SAMPLER_SPECS.items()}


def get_spec(name: str) -> SamplerSpec:
    """The spec of sampler ``name``; an OptionError about 'sampler' with the closest name otherwise."""
    if name not in SAMPLER_SPECS:
        close = difflib.get_close_matches(name, list(SAMPLER_SPECS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise OptionError("sampler", f"{OPTION}: unknown sampler '{name}'{hint} (available: "
                                     f"{', '.join(SAMPLER_SPECS)})")
    return SAMPLER_SPECS[name]


def get_sampler(name: str) -> Callable:
    return get_spec(name).fn


def check_timesteps_name(sampler: str, name: Optional[str]) -> None:
    """Fail fast on a step schedule the sampler cannot use (an OptionError about 'step_schedule')."""
    get_spec(sampler).check_step_schedule(name)


def fit_step_schedule(spec: SamplerSpec, model, schedule: NoiseSchedule, shape: Sequence[int], steps: int, *,
                      prediction: str = "eps", clip_x0: Optional[float] = None, device="cpu",
                      labels: Optional[torch.Tensor] = None, seed: int = 0, calibration: int = 256) -> torch.Tensor:
    """The ``optimized`` step schedule of sampler ``spec`` with ``steps`` NFE, fitted to ``model``: an
    optimisation (:func:`~ddpmlab.samplers.steps.optimize_timesteps`) on ``calibration`` noise samples
    drawn with seed + 20000 (never the sampling noise), conditioned on the first ``labels``.
    Returns the timesteps, for the sampler's ``timesteps=``.  x shapes: (B, *shape)."""
    if spec.schedule_kind != TIMESTEPS or spec.stochastic:
        raise ConfigError(f"the 'optimized' step schedule is fitted to deterministic solvers; {spec.name} is not one")
    calibration = calibration if labels is None else min(calibration, len(labels))
    x_cal = torch.randn((calibration, *shape), generator=torch.Generator().manual_seed(seed + 20_000)).to(device)
    y = None if labels is None else labels[:calibration].to(device)
    predict = ModelPredictor(model, schedule, prediction, y=y, clip_x0=clip_x0)
    return optimize_timesteps(predict, schedule, spec.fn, steps, x_cal)
