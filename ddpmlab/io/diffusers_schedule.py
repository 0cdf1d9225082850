"""diffusers' words for a run's diffusion: the scheduler config both ways, and the optional import.

A ddpmlab ``diffusion`` section (schedule, prediction, reverse variance, T, zero-terminal SNR)
and a diffusers ``DDPMScheduler`` config (``beta_schedule`` or ``trained_betas``,
``prediction_type``, ``variance_type``, ...) describe the same forward process; the maps here
translate one into the other and refuse what does not map.  A flow run (diffusion.process flow)
is diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3's): x_t = (1 - sigma) x_0 + sigma eps, the
network's output the velocity eps - x_0 at timestep sigma * num_train_timesteps, which is ddpmlab's
flow time t and network time t * T (:mod:`ddpmlab.diffusion.flow`); its ``shift`` is diffusion.flow_shift.
diffusers is an optional dependency (``pip install 'ddpmlab[diffusers]'``), imported only when a
function needs it.
"""

from __future__ import annotations

import torch

from ddpmlab.config import Config
from ddpmlab.diffusion.reverse import VARIANCES  # diffusers' variance_type uses the same names
from ddpmlab.diffusion.schedules import SCHEDULES, make_betas
from ddpmlab.errors import DDPMError

PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
PREDICTION_FROM_DIFFUSERS = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
# ddpmlab schedule -> diffusers beta_schedule computing the same betas (others go as trained_betas)
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                         "sigmoid": "sigmoid"}
SCHEDULE_FROM_DIFFUSERS = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # a flow run's scheduler class in diffusers
# FlowMatchEulerDiscreteScheduler options that change what the network means or which shift it had:
# refused on import (the sigma spacings, karras/exponential/beta, are step schedules ddpmlab chooses itself)
_FLOW_OPTIONS_THAT_DO_NOT_MAP = {
    "invert_sigmas": "the network would see 1 - t (Mochi's convention), not ddpmlab's flow time t",
    "use_dynamic_shifting": "its shift depends on the image size at sampling time; ddpmlab takes one "
                            "diffusion.flow_shift",
    "shift_terminal": "its step schedule is stretched to end above t = 0; ddpmlab's ends at t = 0",
}


def require_diffusers():
    """The diffusers module, or a DDPMError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise DDPMError("this needs HF diffusers, which is not installed; "
                        "install it with `pip install 'ddpmlab[diffusers]'` (or `pip install diffusers`)") from None
    return diffusers


def scheduler_config(cfg: Config) -> dict:
    """DDPMScheduler's constructor arguments for ``cfg.diffusion`` (a DDPM run's)."""
    d = cfg.diffusion
    if d.process != "ddpm":
        raise DDPMError(f"diffusion.process={d.process} has no DDPMScheduler (the DDPM process's): a flow run's "
                        f"diffusers scheduler is {FLOW_SCHEDULER} (flow_scheduler_config)")
    betas = make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    conf = dict(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                prediction_type=PREDICTION_TO_DIFFUSERS[d.prediction],
                variance_type=d.variance, clip_sample=True, clip_sample_range=1.0,
                timestep_spacing="leading", rescale_betas_zero_snr=d.zero_terminal_snr)
    name = SCHEDULE_TO_DIFFUSERS.get(d.schedule)
    if name is not None and torch.allclose(_diffusers_betas(name, conf), betas, rtol=1e-5, atol=1e-8):
        conf["beta_schedule"] = name
    else:  # no diffusers formula gives these betas: write them out
        conf["beta_schedule"], conf["trained_betas"] = "linear", betas.tolist()
    return conf


def flow_scheduler_config(cfg: Config) -> dict:
    """FlowMatchEulerDiscreteScheduler's constructor arguments for a flow run's ``cfg.diffusion``: the training
    grid sigma_i = i / T, i = 1..T (the flow's schedule, :func:`~ddpmlab.diffusion.flow.flow_alphas_cumprod`)
    and SD3's shift s = diffusion.flow_shift (Esser et al. 2024, Sec. 5.3.2)."""
    d = cfg.diffusion
    if d.process != "flow":
        raise DDPMError(f"diffusion.process={d.process} is not a flow: {FLOW_SCHEDULER} does not describe it "
                        "(a DDPM run's scheduler is DDPMScheduler, scheduler_config)")
    return dict(num_train_timesteps=d.num_timesteps, shift=float(d.flow_shift))


def run_scheduler(cfg: Config):
    """The diffusers scheduler of the run's process: DDPMScheduler (ddpm) or FlowMatchEulerDiscreteScheduler (flow)."""
    diffusers = require_diffusers()
    if cfg.diffusion.process == "flow":
        return getattr(diffusers, FLOW_SCHEDULER)(**flow_scheduler_config(cfg))
    return diffusers.DDPMScheduler(**scheduler_config(cfg))


def _diffusers_betas(name: str, conf: dict) -> torch.Tensor:
    diffusers = require_diffusers()
    sched = diffusers.DDPMScheduler(num_train_timesteps=conf["num_train_timesteps"], beta_start=conf["beta_start"],
                                    beta_end=conf["beta_end"], beta_schedule=name)
    return sched.betas.double()


def diffusion_from_scheduler(conf: dict) -> dict:
    """ddpmlab diffusion config keys for a diffusers scheduler config (DDPM/DDIM/PNDM/... share them; a
    FlowMatchEulerDiscreteScheduler's are a flow run's)."""
    if conf.get("_class_name") == FLOW_SCHEDULER:
        return _flow_from_scheduler(conf)
    pred = conf.get("prediction_type", "epsilon")
    if pred not in PREDICTION_FROM_DIFFUSERS:
        raise DDPMError(f"scheduler prediction_type={pred!r} does not map; ddpmlab knows "
                        f"{', '.join(PREDICTION_FROM_DIFFUSERS)}")
    variance = conf.get("variance_type") or "fixed_small"
    if variance not in VARIANCES:
        raise DDPMError(f"scheduler variance_type={variance!r} does not map; ddpmlab knows {', '.join(VARIANCES)}")
    T = conf.get("num_train_timesteps", 1000)
    start, end = conf.get("beta_start", 1e-4), conf.get("beta_end", 0.02)
    name = conf.get("beta_schedule", "linear")
    if conf.get("trained_betas") is not None:
        betas = torch.tensor(conf["trained_betas"], dtype=torch.float64)
        name = next((n for n in SCHEDULES if len(betas) == T
                     and torch.allclose(make_betas(n, T, start, end), betas, rtol=1e-5, atol=1e-8)), None)
        if name is None:
            raise DDPMError(f"scheduler trained_betas match no ddpmlab schedule ({', '.join(SCHEDULES)} with its "
                            "beta_start/beta_end); they do not map")
    elif name in SCHEDULE_FROM_DIFFUSERS:
        name = SCHEDULE_FROM_DIFFUSERS[name]
    else:
        raise DDPMError(f"scheduler beta_schedule={name!r} does not map; ddpmlab knows "
                        f"{', '.join(SCHEDULE_FROM_DIFFUSERS)}")
    return dict(schedule=name, num_timesteps=T, beta_start=start, beta_end=end,
                prediction=PREDICTION_FROM_DIFFUSERS[pred], variance=variance,
                zero_terminal_snr=bool(conf.get("rescale_betas_zero_snr", False)))


def _flow_from_scheduler(conf: dict) -> dict:
    """A flow run's diffusion keys for a FlowMatchEulerDiscreteScheduler config, or a DDPMError naming the key."""
    for key, why in _FLOW_OPTIONS_THAT_DO_NOT_MAP.items():
        if conf.get(key):
            raise DDPMError(f"{FLOW_SCHEDULER} with {key}={conf[key]!r} does not map: {why}")
    shift = conf.get("shift", 1.0)
    if not isinstance(shift, (int, float)) or not shift > 0:
        raise DDPMError(f"{FLOW_SCHEDULER} with shift={shift!r} does not map: the shift must be a number > 0")
    return dict(process="flow", prediction="velocity", num_timesteps=conf.get("num_train_timesteps", 1000),
                flow_shift=float(shift), variance="fixed_large")
