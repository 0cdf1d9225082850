"""Samplers driven by the exact noise predictor of Gaussian (mixture) data reproduce the data."""

import pytest
import torch

from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS, get_sampler

SCHEDULE = NoiseSchedule.make("linear", 1000)


def _run(sampler, data, n, steps, seed=0, schedule=SCHEDULE, **options):
    predict = ModelPredictor(ExactDenoiser(data, schedule), schedule, "eps")
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, data.dim, generator=g, dtype=torch.float64)
    return SAMPLERS[sampler](predict, schedule, x_T, steps, generator=g, **options)


GAUSS = GaussianMixture(means=[[1.0, -0.5, 0.25]], stds=[0.5])


@pytest.mark.parametrize("sampler,steps,options", [
    ("ddpm", 1000, {"variance": "fixed_large"}),
    ("ddpm", 1000, {"variance": "fixed_small"}),
    ("ddpm", 100, {"variance": "fixed_large"}),
    ("ddim", 200, {"eta": 0.0}),
    ("ddim", 500, {"eta": 1.0}),
])
def test_samples_of_gaussian_data_have_its_mean_and_covariance(sampler, steps, options):
    n = 10000
    x = _run(sampler, GAUSS, n, steps, **options)
    # tolerance: 5 standard errors of the mean (0.5 / sqrt(n) = 0.0035) plus discretisation
    assert torch.allclose(x.mean(0), GAUSS.mean(), atol=0.03)
    cov = torch.cov(x.T)
    assert torch.allclose(cov, GAUSS.covariance(), atol=0.03), cov


def test_ddim_samples_the_mixture_weights_and_modes():
    mix = GaussianMixture.ring(k=4, radius=2.0, std=0.15)
    x = _run("ddim", mix, 8000, 100)
    d = torch.cdist(x, mix.means)
    comp = d.argmin(1)
    frac = torch.bincount(comp, minlength=4).double() / len(x)
    assert torch.allclose(frac, mix.weights, atol=0.03)  # each mode gets its 25 %
    assert d.min(1).values.median() < 0.2  # samples sit on the modes (std 0.15 in 2D: median 0.18)


def test_error_shrinks_as_steps_grow():
    mix = GaussianMixture.ring(k=4, radius=2.0, std=0.15)
    ref = mix.sample(4000, torch.Generator().manual_seed(5))

    def err(steps):
        x = _run("ddim", mix, 4000, steps)
        return (torch.cdist(x, mix.means).min(1).values.mean() - torch.cdist(ref, mix.means).min(1).values.mean()).abs()

    e2, e10, e100 = err(2), err(10), err(100)
    assert e2 > e10 > e100 and e100 < 0.02


def test_ddim_with_eta_zero_is_deterministic_and_eta_one_is_not():
    a = _run("ddim", GAUSS, 10, 20, seed=1)
    b = _run("ddim", GAUSS, 10, 20, seed=1)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(10, 3, generator=g, dtype=torch.float64)
    predict = ModelPredictor(ExactDenoiser(GAUSS, SCHEDULE), SCHEDULE)
    c = SAMPLERS["ddim"](predict, SCHEDULE, x_T, 20, generator=torch.Generator().manual_seed(1), eta=1.0)
    d = SAMPLERS["ddim"](predict, SCHEDULE, x_T, 20, generator=torch.Generator().manual_seed(2), eta=1.0)
    assert not torch.allclose(c, d)


def test_callback_sees_every_step():
    seen = []
    predict = ModelPredictor(ExactDenoiser(GAUSS, SCHEDULE), SCHEDULE)
    x_T = torch.randn(4, 3, dtype=torch.float64)
    SAMPLERS["ddim"](predict, SCHEDULE, x_T, 25, callback=lambda k, x, x0: seen.append((k, x.shape, x0.shape)))
    assert [k for k, _, _ in seen] == list(range(25))


def test_ddim_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                    set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(20)
    model = ExactDenoiser(GAUSS, SCHEDULE)
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    ours = SAMPLERS["ddim"](ModelPredictor(model, SCHEDULE), SCHEDULE, x_T, 20, spacing="leading")
    assert torch.allclose(ours, x.double(), atol=1e-5)


def test_ddpm_matches_diffusers_ddpm_scheduler_mean():
    diffusers = pytest.importorskip("diffusers")
    # with the noise switched off, each ancestral step is the posterior mean; compare step by step
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                    variance_type="fixed_small")
    # their float32 tables lose ~3e-4 relative in 1 - abar near t=0; the tables themselves are
    # compared in test_schedules_process.py, here the step formulas are compared in float64
    sched.betas, sched.alphas, sched.alphas_cumprod = SCHEDULE.betas, SCHEDULE.alphas, SCHEDULE.alphas_cumprod
    model = ExactDenoiser(GAUSS, SCHEDULE)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    predict = ModelPredictor(model, SCHEDULE)
    from ddpmlab.diffusion.process import q_posterior
    for t in (999, 500, 10, 1):
        eps, x0 = predict(x, torch.tensor(t))
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        ref_mean = ref.prev_sample - sched._get_variance(t).double().sqrt() * noise
        ours, var, _ = q_posterior(SCHEDULE, x0, x, torch.full((32,), t))
        assert torch.allclose(ref.pred_original_sample.double(), x0, atol=1e-10)
        assert torch.allclose(ours, ref_mean, atol=1e-10)
        assert torch.allclose(var.flatten()[0], sched._get_variance(t).double(), rtol=1e-10)


def test_unknown_sampler_names_the_closest():
    with pytest.raises(ConfigError, match="unknown sampler 'dddim'; did you mean 'ddim'"):
        get_sampler("dddim")


def test_model_output_parameterisations_give_the_same_samples():
    # a v- or x0-predicting model that is exact gives the same DDIM trajectory as eps
    from ddpmlab.diffusion.process import training_target, x0_from_eps

    model = ExactDenoiser(GAUSS, SCHEDULE)

    class As(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def forward(self, x, t, y=None):
            eps = model(x, t)
            x0 = x0_from_eps(SCHEDULE, x, t, eps)
            return training_target(SCHEDULE, x0, t, eps, self.kind)

    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = [SAMPLERS["ddim"](ModelPredictor(As(k), SCHEDULE, k), SCHEDULE, x_T, 10) for k in ("eps", "x0", "v")]
    assert torch.allclose(outs[0], outs[1], atol=1e-8) and torch.allclose(outs[0], outs[2], atol=1e-8)
