"""flow_sde: Euler-Maruyama on the reverse SDE dx = (v + eta eps) dt + sqrt(2 eta t) dW, which has the flow's marginals.

The exact velocity of a Gaussian mixture is the ground truth: many steps must reproduce the data's mean and
covariance within four standard errors of the sample size (a wrong score coefficient, 0.5 or 1.5 of eta, is
off by 0.1 to 0.2 in the covariance here, more than twice the tolerance); eta 0 is flow_euler bit for bit.
"""

import math

import pytest
import torch

from ddpmlab.cli import main
from ddpmlab.config import DiffusionConfig, load_config
from ddpmlab.data import make_toy
from ddpmlab.diffusion.analytic import ExactDenoiser, ExactVelocity, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.guidance import ClassifierFreeGuidance
from ddpmlab.samplers.registry import SAMPLER_SPECS, SAMPLERS
from ddpmlab.training.tasks.diffusion import train

MIX = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.5, 1.0], [0.5, -2.0]]), torch.tensor([0.3, 0.5, 0.2]),
                      torch.tensor([0.5, 0.3, 0.2]))
FLOW = NoiseSchedule.from_config(DiffusionConfig(process="flow", prediction="velocity"))
T = FLOW.num_timesteps
N = 20000


def _predict(model=None) -> ModelPredictor:
    return ModelPredictor(ExactVelocity(MIX, T) if model is None else model, FLOW, "velocity")


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, what) -> None:
    """x's mean and covariance within 4 standard errors of len(x) samples (the errors estimated from x itself)."""
    n = len(x)
    c = x - x.mean(0)
    se_mean = (c.pow(2).mean(0) / n).sqrt()
    se_cov = (c[:, :, None] * c[:, None, :]).reshape(n, -1).std(0).reshape(cov.shape) / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() < 4 * se_mean).all(), (what, x.mean(0), mean, 4 * se_mean)
    assert ((torch.cov(x.T) - cov).abs() < 4 * se_cov).all(), (what, torch.cov(x.T), cov, 4 * se_cov)


@pytest.mark.parametrize("eta", [1.0, 3.0])
def test_many_steps_of_flow_sde_on_the_exact_velocity_reproduce_the_mixtures_mean_and_covariance(eta):
    x = SAMPLERS["flow_sde"](_predict(), FLOW, _noise(N, 1), 200, eta=eta, generator=_gen(2))
    _assert_moments(x, MIX.mean(), MIX.covariance(), eta)
    ode = SAMPLERS["flow_euler"](_predict(), FLOW, _noise(N, 1), 200)
    assert (x - ode).abs().mean() > 0.1  # fresh noise moved each sample: the same law, other paths
    few = SAMPLERS["flow_sde"](_predict(), FLOW, _noise(N, 1), 3, eta=eta, generator=_gen(2))
    assert (torch.cov(few.T) - MIX.covariance()).abs().max() > 0.2  # a few steps are visibly off: it can fail


def test_flow_sde_on_a_ddpm_schedule_has_the_ddpm_marginals_too():
    # the flow samplers run a DDPM model in straight-path coordinates: there too the score is -eps / t
    linear = NoiseSchedule.make("linear", 1000)
    predict = ModelPredictor(ExactDenoiser(MIX, linear), linear, "eps")
    x = SAMPLERS["flow_sde"](predict, linear, _noise(N, 3), 200, generator=_gen(4))
    _assert_moments(x, MIX.mean(), MIX.covariance(), "ddpm")


def test_class_labels_reach_flow_sde_through_the_predictor():
    y = torch.tensor([0, 2]).repeat_interleave(N // 2)  # half component 0, half component 2
    model = ClassifierFreeGuidance(ExactVelocity(MIX, T), y, scale=1.0)
    x = SAMPLERS["flow_sde"](_predict(model), FLOW, _noise(N, 5), 200, generator=_gen(6))
    for k, part in zip((0, 2), x.chunk(2)):
        _assert_moments(part, MIX.means[k], MIX.stds[k] ** 2 * torch.eye(2, dtype=torch.float64), k)


@pytest.mark.parametrize("options", [{}, {"shift": 3.0}, {"timesteps": "karras"}])
def test_eta_zero_is_flow_euler_exactly(options):
    x_T = _noise(300, 7)
    a = SAMPLERS["flow_sde"](_predict(), FLOW, x_T, 25, eta=0.0, generator=_gen(1), **options)
    assert torch.equal(a, SAMPLERS["flow_euler"](_predict(), FLOW, x_T, 25, **options))


def test_a_seed_reproduces_and_another_seed_differs():
    x_T = _noise(64, 8)
    a, b, c = (SAMPLERS["flow_sde"](_predict(), FLOW, x_T, 20, generator=_gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert SAMPLER_SPECS["flow_sde"].stochastic and "eta" in SAMPLER_SPECS["flow_sde"].options


def test_the_last_step_returns_the_x0_prediction_and_callbacks_see_every_level():
    seen = []
    x = SAMPLERS["flow_sde"](_predict(), FLOW, _noise(16, 9), 12, generator=_gen(1),
                             callback=lambda k, x_t, x0: seen.append((x_t, x0)))
    assert len(seen) == 12 and torch.allclose(x, seen[-1][1], atol=1e-12) and torch.equal(seen[-1][0], x)


@pytest.mark.parametrize("eta", [-0.5, float("nan"), float("inf"), True, "1"])
def test_a_bad_eta_is_refused_naming_it(eta):
    with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
        SAMPLERS["flow_sde"](_predict(), FLOW, _noise(4, 1), 5, eta=eta)


# --- on a run, from the command line ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def moons_flow_run(tmp_path_factory):
    cfg = load_config("toy2d", [f"train.out_dir={tmp_path_factory.mktemp('flow_sde')}", "train.name=moons",
                                "data.toy=moons", "diffusion.process=flow", "diffusion.prediction=velocity",
                                "diffusion.t_sampling=logit_normal", "train.steps=500", "train.ema_start=100",
                                "train.save_every=500", "train.sample_n=16", "train.sample_steps=10",
                                "train.sample_sampler=null", "train.tensorboard=false"])
    return train(cfg, progress=False)


def test_ddpm_sample_takes_flow_sde_on_a_flow_run_and_its_samples_lie_on_the_moons(moons_flow_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    args = ["sample", str(moons_flow_run), "--sampler", "flow_sde", "--out", str(out), "--no-progress"]
    assert main([*args, "--eta", "0.5", "--n", "16"]) == 0 and out.is_file()
    assert main([*args, "--eta", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eta must be a finite number >= 0" in err[0], err
    run = load_run(moons_flow_run, device="cpu")
    plan = plan_request(run, SamplingRequest(n=2000, sampler="flow_sde", steps=100), log=lambda m: None)
    assert plan.options == {"shift": 1.0}  # the run's diffusion.flow_shift; eta: the sampler's default 1
    dist = torch.cdist(draw_samples(run, plan, progress=False), make_toy("moons", 20000, seed=123)).min(1).values
    assert dist.median() < 0.15 and (dist < 0.15).float().mean() > 0.5, dist.median()
