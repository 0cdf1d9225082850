"""EDM preconditioning and log-normal noise levels (Karras et al. 2022) against exact answers."""

import math

import pytest
import torch

from ddpmlab.config import load_config
from ddpmlab.diffusion.objectives import DiffusionObjective, LogNormalTimesteps, edm_weight
from ddpmlab.diffusion.process import edm_coefficients, eps_from_x0, q_sample
from ddpmlab.diffusion.schedules import NoiseSchedule, make_betas
from ddpmlab.errors import ConfigError
from ddpmlab.models import build_model
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.models.preconditioning import EDMPreconditioned
from ddpmlab.samplers import SAMPLERS, ModelPredictor
from ddpmlab.samplers.guidance import num_classes_of

SD = 0.5  # sigma_data; the Gaussian test data is N(0, SD^2 I), so EDM's targets have unit variance
S = NoiseSchedule.from_betas(make_betas("linear", 1000))


def test_coefficients_equal_edm_table_1_in_ve_form():
    t = torch.tensor([0, 10, 300, 999])
    abar = S.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt()
    c_in, c_skip, c_out = (c.reshape(-1) for c in edm_coefficients(S, t, abar, SD))
    # EDM: D(x) = c_skip x + c_out F(c_in x) on the VE variable x = x_t / sqrt(abar)
    ve_skip, ve_out, ve_in = SD**2 / (sigma**2 + SD**2), sigma * SD / (sigma**2 + SD**2).sqrt(), \
        1 / (sigma**2 + SD**2).sqrt()
    assert torch.allclose(c_skip, ve_skip / abar.sqrt(), rtol=1e-12)
    assert torch.allclose(c_out, ve_out, rtol=1e-12)
    assert torch.allclose(c_in, ve_in / abar.sqrt(), rtol=1e-12)


def test_edm_loss_is_the_eps_loss_times_the_known_weight_and_the_inner_networks_loss():
    net = MLPDenoiser(dim=2, hidden=32, num_layers=2, time_embed_dim=16)
    model = EDMPreconditioned(net, S, SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 2, generator=g) * SD, torch.randn(64, 2, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    edm = DiffusionObjective(S, prediction="edm", sigma_data=SD)
    loss = edm(model, x0, t=t, noise=noise)
    with torch.no_grad():
        x_t = q_sample(S, x0, t, noise)
        d = model(x_t, t)
        eps_hat = eps_from_x0(S, x_t, t, d)
        abar = S.alphas_cumprod[t]
        sigma2 = (1 - abar) / abar
        by_eps = ((eps_hat - noise).pow(2).mean(1) * (sigma2 + SD**2) / SD**2).mean()  # the known weighting
        c_in, c_skip, c_out = edm_coefficients(S, t, x_t, SD)
        f_target = (x0 - c_skip * x_t) / c_out
        by_f = (net(c_in * x_t, t) - f_target).pow(2).mean()  # EDM: the inner network's loss, unweighted
    assert torch.allclose(loss, by_eps.float(), rtol=1e-4)
    assert torch.allclose(loss, by_f, rtol=1e-4)
    assert torch.allclose(edm_weight(S, t, SD), (1 / c_out.reshape(-1) ** 2).float(), rtol=1e-5)


class ExactInner(torch.nn.Module):
    """The F whose preconditioned output is E[x0 | x_t] for N(0, SD^2) data (c_in x_t arrives as input)."""

    def forward(self, x, t, y=None):
        t = torch.as_tensor(t).long().reshape(-1)
        c_in, c_skip, c_out = edm_coefficients(S, t, x, SD)
        x_t = x / c_in
        abar = S.alphas_cumprod[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        mean = abar.sqrt() * SD**2 / (abar * SD**2 + 1 - abar) * x_t
        return (mean - c_skip * x_t) / c_out


def test_the_ideal_denoisers_edm_loss_is_one_at_every_noise_level_and_samplers_reproduce_the_data():
    model = EDMPreconditioned(ExactInner(), S, SD)
    g = torch.Generator().manual_seed(1)
    edm = DiffusionObjective(S, prediction="edm", sigma_data=SD)
    for t in (0, 50, 400, 999):  # Var(x0 | x_t) / c_out^2 = 1 exactly for N(0, SD^2) data
        x0 = torch.randn(200000, 1, generator=g, dtype=torch.float64) * SD
        noise = torch.randn(200000, 1, generator=g, dtype=torch.float64)
        loss = edm(model, x0, t=torch.full((200000,), t), noise=noise)
        assert abs(float(loss) - 1.0) < 0.015, (t, float(loss))
    x0 = model(x0 * 0 + 0.3, torch.full((200000,), 500))  # the exact posterior mean, in float64
    abar = S.alphas_cumprod[500]
    assert torch.allclose(x0, abar.sqrt() * SD**2 / (abar * SD**2 + 1 - abar) * 0.3, rtol=1e-12)
    x = SAMPLERS["ddpm"](ModelPredictor(model, S, "edm"), S, torch.randn(20000, 1, generator=g, dtype=torch.float64),
                         1000, generator=g)
    assert abs(float(x.std()) - SD) < 0.01 and abs(float(x.mean())) < 0.01


class IdealBinary(torch.nn.Module):
    """The ideal denoiser E[x0 | x_t] of data uniform on {-SD, SD}^2: SD tanh(sqrt(abar) SD x_t / (1 - abar))."""

    def forward(self, x, t, y=None):
        abar = S.alphas_cumprod[torch.as_tensor(t).long().reshape(-1)].to(x.dtype).reshape(-1, 1)
        return SD * torch.tanh(abar.sqrt() * SD * x / (1 - abar))


def test_training_a_small_network_with_edm_approaches_the_ideal_denoisers_loss():
    def binary(n, g):
        return (torch.randint(0, 2, (n, 2), generator=g) * 2 - 1) * SD

    edm = DiffusionObjective(S, prediction="edm", sigma_data=SD, t_sampling="lognormal")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ideal = float(edm(IdealBinary(), binary(100000, g), t=edm.sample_timesteps(100000, generator=g),
                          noise=torch.randn(100000, 2, generator=g)))
    torch.manual_seed(0)
    model = EDMPreconditioned(MLPDenoiser(dim=2, hidden=64, num_layers=2, time_embed_dim=32), S, SD)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(400):
        x0 = binary(512, g)
        t = edm.sample_timesteps(512, generator=g)  # the same draw order as the measured run
        loss = edm(model, x0, t=t, noise=torch.randn(512, 2, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-100:]) / 100
    # unit-variance targets: an untrained network's loss is ~1, the ideal denoiser's the floor
    # (measured: 0.99 at the start, 0.525 over the last 100 steps, ideal 0.502)
    assert abs(first - 1.0) < 0.1 and ideal < 0.6, (first, ideal)
    assert last - ideal < 0.25 * (first - ideal), (first, last, ideal)


def test_lognormal_timesteps_follow_the_noise_level_distribution():
    sampler = LogNormalTimesteps(S, -1.2, 1.2)
    t = sampler.sample(100000, generator=torch.Generator().manual_seed(3))
    log_sigma = sampler.log_sigma[t]
    assert abs(float(log_sigma.mean()) + 1.2) < 0.02 and abs(float(log_sigma.std()) - 1.2) < 0.02
    # each draw goes to the timestep whose ln sigma_t is nearest (P_mean 0, P_std 1: the draw itself)
    drawn = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = LogNormalTimesteps(S, 0.0, 1.0).sample(1000, generator=torch.Generator().manual_seed(4))
    nearest = (sampler.log_sigma[None, :] - drawn[:, None]).abs().argmin(1)
    assert torch.equal(t, nearest)


def test_config_builds_the_preconditioned_network_and_refuses_min_snr():
    cfg = load_config("toy2d", ["diffusion.prediction=edm", "diffusion.sigma_data=0.7"])
    model = build_model(cfg)
    assert isinstance(model, EDMPreconditioned) and model.sigma_data == 0.7
    assert all(k.startswith("net.") for k in model.state_dict())
    conditional = build_model(load_config("mnist_ddpm", ["diffusion.prediction=edm", "diffusion.min_snr_gamma=null",
                                                         "model.num_classes=10"]))
    assert num_classes_of(conditional) == 10  # classifier-free guidance sees the classes through the wrapper
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        load_config("toy2d", ["diffusion.prediction=edm", "diffusion.min_snr_gamma=5"])
    with pytest.raises(ConfigError, match="lognormal_std"):
        load_config("toy2d", ["diffusion.t_sampling=lognormal", "diffusion.lognormal_std=0"])
    assert math.isfinite(float(edm_weight(S, torch.tensor([999]), 0.5)))
