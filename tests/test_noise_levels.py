"""The per-noise-level measurements (evaluate.noise_levels) against closed forms on Gaussian data."""

import math

import pytest
import torch

from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.process import x0_from_eps
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.noise_levels import denoising_errors, error_gains
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.samplers.steps import resolve_timesteps, sigmas_for

SCHEDULE = NoiseSchedule.make("linear", 1000)
S = 0.5  # the data: N(mu, S^2 I) in 3 dimensions
GAUSS = GaussianMixture(means=[[1.0, -0.5, 0.25]], stds=[S])
TS = [0, 50, 200, 500, 999]

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact():
    return ModelPredictor(ExactDenoiser(GAUSS, SCHEDULE), SCHEDULE, "eps")


def _abar(t):
    return float(SCHEDULE.alphas_cumprod[t])


def test_the_exact_denoisers_errors_are_the_closed_form_ones_and_its_defect_is_zero():
    x0 = GAUSS.sample(40000, torch.Generator().manual_seed(0))
    for e in denoising_errors(_exact(), SCHEDULE, x0, TS, seed=1, batch_size=10000):
        a = _abar(e.t)
        var = a * S**2 + 1 - a  # Var x_t per coordinate
        assert e.eps_mse == pytest.approx(a * S**2 / var, rel=0.03, abs=1e-4)  # 1 - E eps_hat^2
        assert e.x0_rmse == pytest.approx(math.sqrt(S**2 * (1 - a) / var), rel=0.02)  # the posterior std
        assert abs(e.defect) < 4 * e.defect_se + 1e-12, e  # orthogonality: E[eps_hat . (eps_hat - eps)] = 0
        assert e.sigma == pytest.approx(math.sqrt((1 - a) / a), rel=1e-9)


def test_the_defect_measures_a_miscalibrated_noise_prediction():
    lam = 1.2  # eps_hat scaled by lam: defect = 2 (lam^2 - lam) E eps_hat^2 = 2 (lam^2 - lam) (1 - a) / Var x_t
    exact = _exact()

    def over(x_t, t):
        eps, _ = exact(x_t, t)
        return lam * eps, x0_from_eps(SCHEDULE, x_t, t, lam * eps)

    x0 = GAUSS.sample(40000, torch.Generator().manual_seed(0))
    for e in denoising_errors(over, SCHEDULE, x0, TS[1:], seed=1, batch_size=40000):
        a = _abar(e.t)
        want = 2 * (lam**2 - lam) * (1 - a) / (a * S**2 + 1 - a)
        assert abs(e.defect - want) < 4 * e.defect_se and e.defect_se < 0.1 * want, (e, want)
    with pytest.raises(ConfigError, match="outside 0..999"):
        denoising_errors(exact, SCHEDULE, x0, [1000])


def test_an_ode_solvers_gains_are_the_product_of_its_step_jacobians():
    # Euler on dx/dsigma = (x - D) / sigma with D = mu + S^2 / (S^2 + sigma^2) (x - mu): linear, so an x0 error e at
    # evaluation k moves x_{k+1} by (1 - sigma_{k+1} / sigma_k) e and every later step multiplies it by its Jacobian
    n = 8
    sig = sigmas_for(SCHEDULE, resolve_timesteps("karras", SCHEDULE, n)).tolist()
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gains = error_gains(SAMPLERS["euler"], _exact(), SCHEDULE, x_T, n, size=0.05)
    assert [g.call for g in gains] == list(range(n))
    for g in gains:
        k = g.call
        want = 1 - sig[k + 1] / sig[k]
        for j in range(k + 1, n):
            want *= 1 + (sig[j + 1] / sig[j] - 1) * sig[j] ** 2 / (S**2 + sig[j] ** 2)
        assert g.gain == pytest.approx(want, rel=1e-6), (k, g.gain, want)
        assert g.sigma == pytest.approx(sig[k], rel=1e-6)
    assert gains[-1].gain == pytest.approx(1.0)  # the last x0 prediction is the sample
    # the exact flow carries an error at sigma down by S / sqrt(S^2 + sigma^2): Euler's gains approach it
    fine = error_gains(SAMPLERS["euler"], _exact(), SCHEDULE, x_T, 200, calls=[100])[0]
    flow = S / math.sqrt(S**2 + fine.sigma**2) * (1 - sigmas_for(SCHEDULE, resolve_timesteps(
        "karras", SCHEDULE, 200)).tolist()[101] / fine.sigma)
    assert fine.gain == pytest.approx(flow, rel=0.05)


def test_noise_injection_contracts_errors_that_the_ode_carries():
    x_T = torch.randn(256, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ode = error_gains(SAMPLERS["dpmpp_2m_sde"], _exact(), SCHEDULE, x_T, 20, eta=0.0)
    sde = error_gains(SAMPLERS["dpmpp_2m_sde"], _exact(), SCHEDULE, x_T, 20)
    # an error made at sigma: ODE ~ S / sqrt(S^2 + sigma^2) of it left, SDE ~ S^2 / (S^2 + sigma^2): less above ~S
    high = [k for k, g in enumerate(ode) if g.sigma > 2 * S]
    assert high and all(sde[k].gain < 0.6 * ode[k].gain for k in high), [(o.gain, g.gain) for o, g in zip(ode, sde)]
    with pytest.raises(ConfigError, match="makes 20 model evaluations"):
        error_gains(SAMPLERS["dpmpp_2m_sde"], _exact(), SCHEDULE, x_T, 20, calls=[20])
