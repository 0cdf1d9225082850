"""Schedules and the forward process against closed forms and diffusers as an oracle."""

import math

import pytest
import torch

from ddpmlab.diffusion.process import (
    eps_x0_from_output,
    q_posterior,
    q_sample,
    score_from_eps,
    training_target,
    x0_from_eps,
)
from ddpmlab.diffusion.schedules import SCHEDULES, NoiseSchedule, make_betas, select_timesteps
from ddpmlab.errors import ConfigError


@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("quadratic", "scaled_linear"),
                                         ("sigmoid", "sigmoid"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod_match_diffusers(ours, theirs):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod.double()
    s = NoiseSchedule.make(ours, 1000)
    assert torch.allclose(s.alphas_cumprod, ref, atol=1e-6, rtol=0)


def test_linear_schedule_is_the_papers():
    s = NoiseSchedule.make("linear", 1000)
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # Ho et al. 2020: alpha_bar_T ~ 4e-5, so x_T is almost pure noise
    assert s.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - (1e-4 + k * (0.02 - 1e-4) / 999)
                                                                   for k in range(1000)), rel=1e-9)
    assert s.alphas_cumprod[-1] < 5e-5


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [10, 1000, 5000])
def test_every_schedule_is_a_valid_forward_process(name, T):
    s = NoiseSchedule.make(name, T)
    assert s.num_timesteps == T
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()  # noise only grows
    assert (s.log_snr[1:] < s.log_snr[:-1]).all()
    assert torch.allclose(s.log_snr, torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod)))


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'"):
        make_betas("cosin", 100)


def test_forward_moments_match_closed_form():
    # x0 ~ N(mu, s^2) => x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar)
    s = NoiseSchedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    mu, sd, n = 1.5, 0.3, 400_000
    for t in (0, 100, 500, 999):
        x0 = mu + sd * torch.randn(n, generator=g, dtype=torch.float64)
        xt = q_sample(s, x0, torch.full((n,), t), torch.randn(n, generator=g, dtype=torch.float64))
        abar = s.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * mu, abs=4e-3)
        assert xt.var().item() == pytest.approx(abar * sd**2 + 1 - abar, rel=1e-2)


def test_posterior_matches_bayes_rule():
    # q(x_{t-1} | x_t, x0) from Bayes: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}),
    # likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)
    s = NoiseSchedule.make("cosine", 200)
    x0 = torch.linspace(-1, 1, 7, dtype=torch.float64)
    xt = torch.linspace(2, -3, 7, dtype=torch.float64)
    for t in (1, 5, 100, 199):
        a_prev, alpha, beta = s.alphas_cumprod[t - 1], s.alphas[t], s.betas[t]
        prec = 1 / (1 - a_prev) + alpha / beta
        mean = (a_prev.sqrt() * x0 / (1 - a_prev) + alpha.sqrt() * xt / beta) / prec
        m, v, logv = q_posterior(s, x0, xt, torch.full((7,), t))
        assert torch.allclose(m, mean, atol=1e-12)
        assert torch.allclose(v.flatten(), (1 / prec).expand(7), atol=1e-12)
        assert torch.allclose(logv.flatten(), torch.log(1 / prec).expand(7), atol=1e-9)


def test_posterior_at_t0_returns_x0():
    s = NoiseSchedule.make("linear", 1000)
    x0, xt = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    m, v, _ = q_posterior(s, x0, xt, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(m, x0) and (v == 0).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_recover_eps_and_x0(prediction):
    s = NoiseSchedule.make("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=g)
    xt = q_sample(s, x0, t, eps)
    target = training_target(s, x0, t, eps, prediction)
    eps_hat, x0_hat = eps_x0_from_output(s, xt, t, target, prediction)
    assert torch.allclose(eps_hat, eps, atol=1e-6) and torch.allclose(x0_hat, x0, atol=1e-6)


def test_score_of_gaussian_data_matches_analytic():
    # x0 ~ N(0, 1) keeps x_t ~ N(0, 1): score(x_t) = -x_t, optimal eps = sqrt(1 - abar) x_t
    s = NoiseSchedule.make("linear", 1000)
    xt = torch.randn(10, dtype=torch.float64)
    t = torch.full((10,), 300)
    eps = (1 - s.alphas_cumprod[300]).sqrt() * xt
    assert torch.allclose(score_from_eps(s, xt, t, eps), -xt)
    assert torch.allclose(x0_from_eps(s, xt, t, eps), s.alphas_cumprod[300].sqrt() * xt)


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
    s = NoiseSchedule.make("linear", 1000)
    ts = select_timesteps(1000, 50)
    r = s.respace(ts)
    assert r.num_timesteps == 50
    assert torch.equal(r.timesteps, ts)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[ts], rtol=1e-12)
    assert torch.allclose(s.respace(range(1000)).betas, s.betas, rtol=1e-10)


@pytest.mark.parametrize("spacing", ["uniform", "leading", "trailing"])
def test_timestep_selection_is_increasing_and_in_range(spacing):
    for steps in (1, 7, 50, 1000):
        ts = select_timesteps(1000, steps, spacing)
        assert len(ts) == steps and ts.min() >= 0 and ts.max() <= 999
        assert (ts[1:] > ts[:-1]).all()
    assert select_timesteps(1000, 10, "trailing").tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert select_timesteps(1000, 10, "leading").tolist() == list(range(0, 1000, 100))


@pytest.mark.parametrize("steps", [0, 1001, -3])
def test_steps_out_of_range_is_a_config_error(steps):
    with pytest.raises(ConfigError, match="between 1 and 1000"):
        select_timesteps(1000, steps)
