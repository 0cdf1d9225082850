"""The variational bound, bits/dim and learned variances against closed forms and diffusers."""

import math

import pytest
import torch

from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.likelihood import (
    EIGHT_BIT,
    LN2,
    bits_per_dim,
    check_decoder_data,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_kl,
    vlb_term,
)
from ddpmlab.diffusion.process import extract, q_sample
from ddpmlab.diffusion.reverse import interpolation_for, learned_log_variance
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.nll import bound_terms, model_reverse, summarize

S = NoiseSchedule.make("linear", 1000)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- Gaussian data: the exact model

D, SD = 64, 0.15
MU = 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
GAUSS = GaussianMixture(MU[None], [SD])


def true_reverse_log_variance(i, like):
    """log Var of q(x_{t-1} | x_t) for x_0 ~ N(mu, SD^2 I): Var(x_{t-1}) beta_t / Var(x_t)."""
    abar_prev, alpha, beta = (extract(a, i, like) for a in (S.alphas_cumprod_prev, S.alphas, S.betas))
    v_prev = abar_prev * SD**2 + 1 - abar_prev
    return torch.log(v_prev * beta / (alpha * v_prev + beta)).expand_as(like)


class ExactLearnedVariance(torch.nn.Module):
    """The exact model with a variance head: [analytic eps, v with the true reverse variance].

    ``exact_variance=False``: v = -1, i.e. the fixed beta_tilde_t of Ho et al. (a wrong model).
    """

    def __init__(self, exact_variance=True):
        super().__init__()
        self.eps, self.exact_variance = ExactDenoiser(GAUSS, S), exact_variance

    def forward(self, x, t, y=None):
        v_raw = interpolation_for(S, t, true_reverse_log_variance(t, x)) if self.exact_variance else -torch.ones_like(x)
        return torch.cat([self.eps(x, t), v_raw], 1)


def _bound(model, x0, seed, variance="learned_range", **kw):
    reverse = model_reverse(model, S, "eps", variance)
    terms, prior = bound_terms(reverse, S, x0, generator=torch.Generator().manual_seed(seed), **kw)
    return terms.sum(1) + prior  # (N,) nats/dim


def test_vlb_of_the_exact_model_equals_the_analytic_nll_of_gaussian_data():
    x0 = GAUSS.sample(2000, torch.Generator().manual_seed(1))
    nll = -GAUSS.log_prob(x0) / D  # nats/dim
    gap = (_bound(ExactLearnedVariance(), x0, seed=2, decoder="continuous") - nll).mean()
    # the exact reverse process makes the bound tight (its only slack, L_T's mismatch, is ~1e-5);
    # the Monte Carlo error of one x_t per t over 2000 x 64 values is ~0.003 nats/dim
    assert abs(gap) < 0.01, gap
    # the test can fail: the right mean with the fixed variance beta_tilde_t gives a looser bound
    worse = (_bound(ExactLearnedVariance(exact_variance=False), x0[:300], seed=2, decoder="continuous")
             - nll[:300]).mean()
    assert worse > 0.1, worse


def test_bits_per_dim_of_8bit_gaussian_data_is_the_density_plus_the_bin_width():
    # 8-bit data: P(bin) ~ p(x) * 2/255, so bits/dim = (NLL_cont + log(255/2)) / ln 2 (the
    # usual conversion of a density on [-1, 1] to 8-bit bits/dim)
    x = GAUSS.sample(1000, torch.Generator().manual_seed(3))
    x0 = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    assert x0.abs().max() < 1  # no clipped edge bins in this sample
    bound = _bound(ExactLearnedVariance(), x0, seed=4, decoder="discretized", bin_width=EIGHT_BIT)
    result = summarize(torch.zeros(len(bound), 1, dtype=torch.float64), bound)
    expected = bits_per_dim((-GAUSS.log_prob(x0) / D).mean() + math.log(127.5))
    assert result.bits_per_dim == pytest.approx(float(expected), abs=0.015)
    assert bits_per_dim(math.log(256.0)) == pytest.approx(8.0, rel=1e-12)  # uniform over 256 values


def test_kl_terms_of_a_model_that_is_exactly_right_are_zero():
    # a model that knows the noise: its mean is the posterior mean, its variance beta_tilde (v = -1)
    g = torch.Generator().manual_seed(5)
    x0 = GAUSS.sample(64, g)
    for i in (1, 10, 300, 999):
        idx = torch.full((64,), i)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = q_sample(S, x0, idx, noise)
        for v, zero in ((-1.0, True), (1.0, False)):
            out = torch.cat([noise, torch.full_like(noise, v)], 1)
            mean, log_var = model_reverse(lambda x, t, y: out, S, "eps", "learned_range")(x_t, idx)
            kl = vlb_term(S, x0, x_t, idx, mean, log_var)
            if zero:
                assert kl.abs().max() < 1e-10, (i, kl.abs().max())
            elif i < 999:  # the variance beta_t instead of beta_tilde_t costs a KL (at t = T they agree)
                assert (kl > 1e-6).all()


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(6)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, atol=1e-12)


# ----------------------------------------------------------------- the discretized decoder (Eq. 13)

@pytest.mark.parametrize("mean", [-1.3, -0.999, 0.0, 0.37, 1.0])
@pytest.mark.parametrize("std", [1e-4, 1e-3, 0.05, 1.0, 30.0])
def test_discretized_decoder_likelihoods_of_all_256_bins_sum_to_one(mean, std):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    ll = discretized_gaussian_log_likelihood(x, torch.tensor(mean), torch.tensor(2 * math.log(std)))
    assert torch.isfinite(ll).all()  # even 100 standard deviations into the tail
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_decoder_is_the_gaussian_mass_of_the_bin():
    normal = torch.distributions.Normal(torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    x = torch.tensor([-1.0, -0.2, 0.1, 1.0], dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(x, normal.mean, 2 * normal.stddev.log())
    h = EIGHT_BIT / 2
    ref = torch.stack([normal.cdf(x[0] + h), normal.cdf(x[1] + h) - normal.cdf(x[1] - h),
                       normal.cdf(x[2] + h) - normal.cdf(x[2] - h), 1 - normal.cdf(x[3] - h)]).log()
    assert torch.allclose(ll, ref, atol=1e-10)


# ----------------------------------------------------------------- prior term

def test_prior_term_of_the_linear_schedule_is_below_1e_5_bits_per_dim():
    # 8-bit images with CIFAR-10's channel statistics (mean 0.47, std 0.25 on [0, 1])
    g = torch.Generator().manual_seed(7)
    x = (0.47 + 0.25 * torch.randn(256, 3, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    x0 = (x * 255).round() / 127.5 - 1
    prior = bits_per_dim(prior_kl(S, x0).mean()).item()
    assert 0 < prior < 1e-5, prior
    # closed form: 1/2 [abar_T E[x0^2] - abar_T - log(1 - abar_T)] nats per dimension
    a = S.alphas_cumprod[-1].item()
    closed = 0.5 * (a * x0.pow(2).mean().item() - a - math.log1p(-a)) / LN2
    assert prior == pytest.approx(closed, rel=1e-9)


# ----------------------------------------------------------------- learned variance, respaced sampling

def test_learned_variance_spans_beta_tilde_to_beta():
    i = torch.arange(1, 1000)
    lo = learned_log_variance(S, i, torch.full((999,), -1.0, dtype=torch.float64))
    hi = learned_log_variance(S, i, torch.ones(999, dtype=torch.float64))
    assert torch.allclose(lo.exp(), S.posterior_variance[1:], rtol=1e-12)
    assert torch.allclose(hi.exp(), S.betas[1:], rtol=1e-12)
    v = torch.rand(999, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2 - 1
    assert torch.allclose(interpolation_for(S, i, learned_log_variance(S, i, v)), v, atol=1e-9)


class _WithVariance(torch.nn.Module):
    """Analytic eps of Gaussian data and a variance output that depends on x and t."""

    def __init__(self, data, schedule, head=True):
        super().__init__()
        self.eps, self.head = ExactDenoiser(data, schedule), head

    def forward(self, x, t, y=None):
        eps = self.eps(x, t)
        if not self.head:
            return eps
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
        return torch.cat([eps, torch.tanh(x) * 0.8 - 0.6 + t / 2000], 1)


SMALL = GaussianMixture(means=[[1.0, -0.5, 0.25]], stds=[0.5])


def test_respaced_learned_variance_sampler_matches_diffusers_learned_range():
    diffusers = pytest.importorskip("diffusers")
    from ddpmlab.samplers import ModelPredictor
    from ddpmlab.samplers.registry import SAMPLERS

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                    variance_type="learned_range", timestep_spacing="linspace")
    sched.set_timesteps(50)
    sched.alphas_cumprod = S.alphas_cumprod  # float64 tables: compare the step formulas
    model = _WithVariance(SMALL, S)
    x_T = torch.randn(256, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    g = torch.Generator().manual_seed(10)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=g).prev_sample
    ours = SAMPLERS["ddpm"](ModelPredictor(model, S), S, x_T, 50, variance="learned_range",
                            generator=torch.Generator().manual_seed(10))
    assert torch.allclose(ours, x, atol=1e-8)
    # and the variance did matter: with the posterior variance the samples differ
    fixed = SAMPLERS["ddpm"](ModelPredictor(model, S), S, x_T, 50, variance="fixed_small",
                             generator=torch.Generator().manual_seed(10))
    assert (fixed - ours).abs().max() > 1e-2


def test_fixed_variance_sampler_on_a_learned_variance_model_uses_only_the_eps_half():
    from ddpmlab.samplers import ModelPredictor
    from ddpmlab.samplers.registry import SAMPLERS

    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for sampler, opts in (("ddpm", {"variance": "fixed_small"}), ("ddim", {})):
        a = SAMPLERS[sampler](ModelPredictor(_WithVariance(SMALL, S), S), S, x_T, 20,
                              generator=torch.Generator().manual_seed(1), **opts)
        b = SAMPLERS[sampler](ModelPredictor(_WithVariance(SMALL, S, head=False), S), S, x_T, 20,
                              generator=torch.Generator().manual_seed(1), **opts)
        assert torch.equal(a, b)


def test_learned_variance_sampler_on_a_model_without_variance_head_is_an_error():
    from ddpmlab.samplers import ModelPredictor
    from ddpmlab.samplers.registry import SAMPLERS

    predict = ModelPredictor(_WithVariance(SMALL, S, head=False), S)
    with pytest.raises(DDPMError, match="no variance head"):
        SAMPLERS["ddpm"](predict, S, torch.randn(4, 3, dtype=torch.float64), 10, variance="learned_range")


# ----------------------------------------------------------------- bad input

def test_nll_of_data_that_is_not_8_bit_needs_a_stated_bin_width():
    from ddpmlab.data import load_digits, make_toy

    toy = make_toy("moons", 100)
    with pytest.raises(DDPMError, match="not 8-bit data.*bin width"):
        check_decoder_data(toy, "discretized", None)
    assert check_decoder_data(toy, "discretized", 0.01) == (0.01, False)  # a stated width: unbounded grid
    digits = load_digits("test")[0]  # 17 grey levels
    with pytest.raises(DDPMError, match="--bin-width"):
        check_decoder_data(digits, "discretized", None)
    assert check_decoder_data(digits, "discretized", 0.125) == (0.125, True)
    assert check_decoder_data(torch.arange(256) / 127.5 - 1, "discretized", None) == (EIGHT_BIT, True)
