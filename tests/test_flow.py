"""Flow matching / rectified flow beside DDPM (diffusion.process: flow).

The exact velocity of a Gaussian mixture is the ground truth: integrated by Euler it reproduces the data;
the change of variables to the VE/VP view puts every existing solver on the flow ODE's path; diffusers'
FlowMatchEulerDiscreteScheduler is the oracle of the time grid and the Euler step; guidance combines
velocities as it combines eps; a tiny flow run trains on the one loop (labels, guidance dropout, EMA,
resume) and lands on its data; logit-normal training times have the closed form's moments.
"""

import math
import re

import numpy as np
import pytest
import torch
from _util import TINY_DIGITS
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import DiffusionConfig, load_config
from ddpmlab.data import make_toy
from ddpmlab.diffusion.analytic import ClassConditionalDenoiser, ExactDenoiser, ExactVelocity, GaussianMixture
from ddpmlab.diffusion.flow import flow_time_of_abar, logit_normal_density, mode_time, vp_from_flow
from ddpmlab.diffusion.objectives import DiffusionObjective, FlowObjective, objective_from_config
from ddpmlab.diffusion.process import network_inputs
from ddpmlab.diffusion.schedules import NoiseSchedule, t_of_sigma
from ddpmlab.errors import ConfigError
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, own_sampler, plan_request
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.flow import flow_times
from ddpmlab.samplers.guidance import ClassifierFreeGuidance
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.training.distributed import draw_t_and_noise
from ddpmlab.training.tasks.diffusion import train

# three unequal, anisotropically placed components: the covariance has an off-diagonal term
MIX = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.5, 1.0], [0.5, -2.0]]), torch.tensor([0.3, 0.5, 0.2]),
                      torch.tensor([0.5, 0.3, 0.2]))
SCHEDULE = NoiseSchedule.from_config(DiffusionConfig(process="flow", prediction="velocity"))
T = SCHEDULE.num_timesteps
FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity"]


def _predict(model=None, y=None) -> ModelPredictor:
    return ModelPredictor(ExactVelocity(MIX, T) if model is None else model, SCHEDULE, "velocity", y=y)


def _noise(n: int, seed: int, dim: int = 2) -> torch.Tensor:
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _timesteps(taus: torch.Tensor) -> torch.Tensor:
    """The training times of flow times taus: noise levels sigma = t / (1 - t)."""
    return t_of_sigma(SCHEDULE, taus / (1 - taus))


def _path(sampler: str, predict, x_T, steps: int, **options) -> list:
    """The sampler's path: the (VP x_t, x0) it reports after every step."""
    seen = []
    SAMPLERS[sampler](predict, SCHEDULE, x_T, steps, callback=lambda k, x, x0: seen.append((x, x0)), **options)
    return seen


def _gap(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(max((xa - xb).abs().max().item(), (ya - yb).abs().max().item()) for (xa, ya), (xb, yb) in zip(a, b))


# --- the flow's schedule and the exact velocity ------------------------------------------------------

def test_the_flow_schedule_is_the_vp_view_of_the_straight_path():
    t = torch.arange(1, T + 1, dtype=torch.float64) / T  # the grid of diffusers' training sigmas
    assert torch.allclose(flow_time_of_abar(SCHEDULE.alphas_cumprod), t, atol=1e-12, rtol=0)
    assert SCHEDULE.alphas_cumprod[-1] == 0  # t = 1 is pure noise
    # the VP x_t = a x0 + b eps is the flow x_t = (1 - t) x0 + t eps times (a + b)
    x0, eps = _noise(5, 1), _noise(5, 2)
    i = torch.tensor([0, 10, 500, 998, 999])
    a, b = SCHEDULE.alphas_cumprod[i, None].sqrt(), (1 - SCHEDULE.alphas_cumprod[i, None]).sqrt()
    x_flow, net_t = network_inputs(SCHEDULE, a * x0 + b * eps, i, "velocity")
    tt = t[i, None]
    assert torch.allclose(x_flow, (1 - tt) * x0 + tt * eps, atol=1e-12)
    assert torch.allclose(net_t, t[i] * T, atol=1e-9)  # the network's time input: t * T


def test_exact_velocity_integrated_by_euler_reproduces_the_mixtures_mean_and_covariance():
    x = SAMPLERS["flow_euler"](_predict(), SCHEDULE, _noise(20000, 1), 200)
    assert (x.mean(0) - MIX.mean()).abs().max() < 0.04, (x.mean(0), MIX.mean())
    assert (torch.cov(x.T) - MIX.covariance()).abs().max() < 0.1, (torch.cov(x.T), MIX.covariance())
    # a few steps are visibly off: the check can fail
    few = SAMPLERS["flow_euler"](_predict(), SCHEDULE, _noise(20000, 1), 2)
    assert (torch.cov(few.T) - MIX.covariance()).abs().max() > 0.3


# --- the change of variables: every existing solver on the flow ODE ----------------------------------

def test_the_change_of_variables_puts_the_ve_euler_path_on_the_flow_euler_path():
    # Euler in sigma on x_VE = x_flow / (1 - t) and Euler in t on x_flow take the same steps, x0 + sigma' eps
    ts = _timesteps(torch.linspace(0.97, 0.02, 30, dtype=torch.float64))
    x_T = _noise(300, 3)
    flow = _path("flow_euler", _predict(), x_T, 30, timesteps=ts)
    assert _gap(flow, _path("euler", _predict(), x_T, 30, timesteps=ts)) < 1e-6
    # the exact eps of the same mixture on the flow's VP schedule (its score): the same path again
    scored = ModelPredictor(ExactDenoiser(MIX, SCHEDULE), SCHEDULE, "eps")
    assert _gap(flow, _path("euler", scored, x_T, 30, timesteps=ts)) < 1e-6
    assert _gap(flow, _path("flow_euler", scored, x_T, 30, timesteps=ts)) < 1e-6


def test_ddim_on_a_flow_run_is_flow_euler_from_pure_noise():
    # DDIM's integer timesteps include T - 1, where alpha_bar = 0: both start at t = 1 exactly
    x_T = _noise(300, 4)
    ddim = _path("ddim", _predict(), x_T, 25)
    assert _gap(ddim, _path("flow_euler", _predict(), x_T, 25, timesteps="uniform")) < 1e-6


@pytest.mark.parametrize("solver", ["dpmpp_3m", "unipc"])
def test_existing_solvers_on_the_ve_view_reach_the_exact_flow_ode_solution(solver):
    # one Gaussian N(mu, s^2 I): the flow ODE carries noise z to mu + s z along
    # x_t = (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) z; start on that path at t0 = 0.9
    mu, s, t0 = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.4, 0.9
    gauss = GaussianMixture(mu[None], s)
    z = _noise(100, 5)
    x_t0 = (1 - t0) * mu + math.sqrt((1 - t0) ** 2 * s**2 + t0**2) * z
    errs = []
    for n in (200, 1000):
        ts = _timesteps(torch.linspace(t0, 0.001, n, dtype=torch.float64))
        x = SAMPLERS[solver](_predict(ExactVelocity(gauss, T)), SCHEDULE, vp_from_flow(x_t0, t0), n, timesteps=ts)
        errs.append((x - (mu + s * z)).abs().max().item())
    assert errs[1] < 2e-5 and errs[0] > 5 * errs[1], errs


def test_second_order_flow_samplers_beat_euler():
    x_T = _noise(500, 6)
    ref = SAMPLERS["flow_midpoint"](_predict(), SCHEDULE, x_T, 1000)

    def err(name, nfe):
        return (SAMPLERS[name](_predict(), SCHEDULE, x_T, nfe) - ref).pow(2).sum(1).mean().sqrt().item()

    for nfe, factor in ((40, 0.5), (80, 0.1)):
        euler = err("flow_euler", nfe)
        for name in ("flow_heun", "flow_midpoint"):
            assert err(name, nfe) < factor * euler, (name, nfe)


# --- diffusers' FlowMatchEulerDiscreteScheduler as the oracle ------------------------------------------

def test_time_grid_shift_and_euler_steps_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 12
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    theirs.set_timesteps(n)
    assert torch.allclose(flow_times(SCHEDULE, n), theirs.sigmas.double(), atol=1e-6)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    shifted.set_timesteps(sigmas=np.linspace(1.0, 1.0 / T, n))  # their own grid, shifted once
    assert torch.allclose(flow_times(SCHEDULE, n, shift=3.0), shifted.sigmas.double(), atol=1e-6)
    # every Euler step, and the timestep the network sees (sigma * T)
    net, seen = ExactVelocity(MIX, T), []

    def spy(x, t, y=None):
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return net(x, t, y)

    x_T = _noise(8, 7).float()
    ours = [x for x, _ in _path("flow_euler", ModelPredictor(spy, SCHEDULE, "velocity"), x_T, n)]
    x = x_T
    for k, timestep in enumerate(theirs.timesteps):
        x = theirs.step(net(x, timestep.expand(len(x))), timestep, x).prev_sample
        sigma = float(theirs.sigmas[k + 1])
        assert torch.allclose(ours[k] * math.sqrt((1 - sigma) ** 2 + sigma**2), x, atol=1e-5), k
        assert math.isclose(seen[k], float(timestep), abs_tol=1e-3), (seen[k], float(timestep))


# --- classifier-free guidance ---------------------------------------------------------------------------

def test_guidance_combines_velocities_as_it_combines_eps_and_x0():
    x_t, i = _noise(50, 8), torch.tensor(612.4, dtype=torch.float64)
    y, k, scale = torch.arange(50) % 3, torch.full((50,), 3), 2.5
    eps_g, x0_g = _predict(ClassifierFreeGuidance(ExactVelocity(MIX, T), y, scale))(x_t, i)
    eps_c, x0_c = _predict(y=y)(x_t, i)
    eps_u, x0_u = _predict(y=k)(x_t, i)
    assert torch.allclose(eps_g, eps_u + scale * (eps_c - eps_u), atol=1e-10)
    assert torch.allclose(x0_g, x0_u + scale * (x0_c - x0_u), atol=1e-10)
    # the exact eps-denoiser of the same classes on the flow's VP schedule, guided: the same prediction
    eps_d, x0_d = ModelPredictor(ClassifierFreeGuidance(ClassConditionalDenoiser(MIX, SCHEDULE), y, scale), SCHEDULE,
                                 "eps")(x_t, i)
    assert torch.allclose(eps_g, eps_d, atol=1e-8) and torch.allclose(x0_g, x0_d, atol=1e-8)
    assert not torch.allclose(eps_g, eps_c, atol=1e-3)  # guidance did something


# --- training on the loop ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    cfg = load_config("toy2d", [f"train.out_dir={tmp_path_factory.mktemp('flow')}", "train.name=moons",
                                "data.toy=moons", *FLOW, "diffusion.t_sampling=logit_normal", "train.steps=500",
                                "train.ema_start=100", "train.save_every=500", "train.sample_n=200",
                                "train.sample_steps=50", "train.sample_sampler=null", "train.tensorboard=false"])
    return train(cfg, progress=False)


def test_a_flow_run_trains_on_the_loop_and_its_samples_lie_on_the_moons(moons_run):
    run = load_run(moons_run, device="cpu")
    plan = plan_request(run, SamplingRequest(n=2000), log=lambda m: None)
    assert (plan.sampler, plan.steps, plan.options["shift"]) == ("flow_euler", 50, 1.0)  # the flow's own sampler
    x = draw_samples(run, plan, progress=False)
    data = make_toy("moons", 20000, seed=123)
    dist = torch.cdist(x, data).min(1).values
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * data.std(0) + data.mean(0)
    base = torch.cdist(noise, data).min(1).values
    assert dist.median() < 0.15 < base.median(), (dist.median(), base.median())
    assert (dist < 0.15).float().mean() > 0.5
    assert (x.std(0) - data.std(0)).abs().max() < 0.1 and (x.mean(0) - data.mean(0)).abs().max() < 0.1


def test_ddpm_sample_on_a_flow_run_samples_as_the_run_says(moons_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", str(moons_run), "--n", "16", "--out", str(out), "--no-progress"]) == 0
    assert "flow_euler, 50 steps" in capsys.readouterr().out and out.is_file()


def test_a_conditional_flow_run_resumes_bit_identically(tmp_path, one_thread):
    # labels, label dropout, guided samples and EMA on a flow; stopped at 4 steps and resumed to 8
    args = [*TINY_DIGITS, *FLOW, "diffusion.min_snr_gamma=null", "diffusion.t_sampling=mode"]
    assert main(["train", *args, "train.steps=8", f"train.out_dir={tmp_path}", "train.name=straight"]) == 0
    assert main(["train", *args, "train.steps=4", f"train.out_dir={tmp_path}", "train.name=stopped"]) == 0
    assert main(["train", "--resume", str(tmp_path / "stopped"), "train.steps=8", "--no-progress"]) == 0
    end = "checkpoints/step_0000008"
    for name in ("model", "ema", "optimizer"):
        a, b = load_file(tmp_path / "straight" / end / f"{name}.safetensors"), \
            load_file(tmp_path / "stopped" / end / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# --- training times -------------------------------------------------------------------------------------

def _flow_objective(*overrides) -> FlowObjective:
    cfg = load_config("toy2d", [*FLOW, *overrides])
    objective = objective_from_config(cfg, NoiseSchedule.from_config(cfg.diffusion))
    assert isinstance(objective, FlowObjective)
    return objective


def _training_times(objective, n: int) -> torch.Tensor:
    """t as the training step draws them (draw_t_and_noise with the step's shared generator)."""
    t, _ = draw_t_and_noise(objective.sample_timesteps, torch.zeros(n, 2), n, 0, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1
    return t.double()


def test_logit_normal_training_times_have_the_closed_forms_moments():
    m, s, n = 0.5, 0.8, 200_000
    t = _training_times(_flow_objective("diffusion.t_sampling=logit_normal", f"diffusion.logit_normal_mean={m}",
                                        f"diffusion.logit_normal_std={s}"), n)
    logit = torch.log(t) - torch.log1p(-t)  # N(m, s^2) by definition
    assert abs(logit.mean() - m) < 4 * s / math.sqrt(n) and abs(logit.std() - s) < 0.01
    # E[t] and E[t^2] against the density of Esser et al. 2024, Eq. 19, integrated numerically
    grid = torch.linspace(1e-7, 1 - 1e-7, 400_001, dtype=torch.float64)
    p = logit_normal_density(grid, m, s)
    assert abs(torch.trapezoid(p, grid) - 1) < 1e-6
    for k in (1, 2):
        want = torch.trapezoid(grid**k * p, grid)
        assert abs(t.pow(k).mean() - want) < 4 * t.pow(k).std() / math.sqrt(n), (k, t.pow(k).mean(), want)


def test_mode_training_times_follow_f_mode_and_the_network_sees_t_times_T():
    objective = _flow_objective("diffusion.t_sampling=mode", "diffusion.mode_scale=1.29")
    n = 200_000
    t = _training_times(objective, n)
    u = torch.linspace(0, 1, 400_001, dtype=torch.float64)
    for k in (1, 2):  # E[t^k] = int_0^1 f_mode(u)^k du (t = f_mode(u), u uniform): E[t] = 1/2 for every s
        want = torch.trapezoid(mode_time(u, 1.29) ** k, u)
        assert abs(t.pow(k).mean() - want) < 4 * t.pow(k).std() / math.sqrt(n), (k, t.pow(k).mean(), want)
    assert abs(torch.trapezoid(mode_time(u, 1.29), u) - 0.5) < 1e-9
    seen = []

    def spy(x, tt, y=None):
        seen.append(tt)
        return torch.zeros_like(x)

    x0, eps, tt = torch.ones(4, 2), torch.zeros(4, 2), torch.tensor([0.0, 0.25, 0.5, 1.0])
    loss = objective(spy, x0, t=tt, noise=eps)
    assert torch.equal(seen[0], tt * 1000)
    assert math.isclose(float(loss), 1.0)  # ||0 - (eps - x0)||^2 per coordinate


# --- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, says", [
    (["diffusion.process=flow"], "set diffusion.prediction=velocity"),
    (["diffusion.prediction=velocity"], "set diffusion.process=flow"),
    (["diffusion.t_sampling=logit_normal"], "set diffusion.process=flow"),
    ([*FLOW, "diffusion.t_sampling=lognormal"], "a flow takes uniform, logit_normal, mode"),
    ([*FLOW, "diffusion.min_snr_gamma=5"], "diffusion.min_snr_gamma=5.0 belong to DDPM runs"),
    ([*FLOW, "diffusion.mode_scale=2"], "'diffusion.mode_scale' must lie in"),
    ([*FLOW, "diffusion.flow_shift=0"], "'diffusion.flow_shift' must be > 0"),
])
def test_flow_keys_are_checked(overrides, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config("toy2d", overrides)


def test_a_ddpm_config_keeps_its_schedule_objective_and_sampler():
    cfg = load_config("toy2d", ["train.sample_sampler=null"])
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    assert torch.equal(schedule.alphas_cumprod, NoiseSchedule.make("linear", 1000).alphas_cumprod)
    assert isinstance(objective_from_config(cfg, schedule), DiffusionObjective)
    assert own_sampler(cfg) == "ddim"
    x, t = torch.randn(3, 2), torch.tensor([1, 2, 3])
    assert all(a is b for a, b in zip(network_inputs(schedule, x, t, "eps"), (x, t)))
    cfg = load_config("toy2d", [*FLOW, "train.sample_sampler=null"])
    assert own_sampler(cfg) == "flow_euler" and not torch.equal(NoiseSchedule.from_config(cfg.diffusion).alphas_cumprod,
                                                                schedule.alphas_cumprod)


def test_what_does_not_map_for_flow_runs_is_refused_in_one_line(moons_run, tmp_path, capsys):
    from ddpmlab.errors import DDPMError
    from ddpmlab.io.diffusers_schedule import scheduler_config

    with pytest.raises(DDPMError, match="process=flow has no DDPMScheduler.*FlowMatchEulerDiscreteScheduler"):
        scheduler_config(load_config("mnist", [*FLOW, "diffusion.min_snr_gamma=null"]))
    assert main(["export", str(moons_run), str(tmp_path / "out")]) == 2  # a toy MLP has no diffusers model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.kind='mlp' does not map" in err[0], err
    # the export of flow runs: tests/test_flow_export.py
    # distillation of flow runs: tests/test_distill_flow.py
