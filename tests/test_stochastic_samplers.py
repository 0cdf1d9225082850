"""Stochastic samplers (DPM-Solver++(2M) SDE, Restart, EDM churn), dynamic thresholding, the ODE-error
metric and the run's recommended sampler, checked against exact scores and closed-form answers."""

import json
import math

import pytest
import torch

from ddpmlab.diffusion.analytic import ExactDenoiser, Gaussian, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule, log_sigmas
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.bench import mixture2d, sliced_w2
from ddpmlab.evaluate.ode_error import convergence_order, diffusers_flow, ode_errors, reference_flow, rmse
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.base import dynamic_threshold
from ddpmlab.samplers.registry import SAMPLER_SPECS, SAMPLERS
from ddpmlab.samplers.steps import resolve_timesteps, sigmas_for

SCHEDULE = NoiseSchedule.make("linear", 1000)
GAUSS = GaussianMixture(means=[[1.0, -0.5, 0.25]], stds=[0.5])
MIX = mixture2d()
STOCHASTIC = ["dpmpp_2m_sde", "restart", "edm"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _predict(data=GAUSS, **kw):
    return ModelPredictor(ExactDenoiser(data, SCHEDULE), SCHEDULE, "eps", **kw)


def _noise(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


# --- the marginals of exact-score sampling ----------------------------------------------------------

@pytest.mark.parametrize("name,steps,options,tol", [
    ("dpmpp_2m_sde", 50, {}, 0.03),
    ("dpmpp_2m_sde", 50, {"solver_type": "heun", "eta": 0.5}, 0.03),
    ("restart", 50, {}, 0.03),
    ("edm", 49, {}, 0.05),  # churn's own discretisation error: 0.035 here, 0.02 at 99 NFE (below)
    ("edm", 99, {}, 0.03),
])
def test_samples_of_gaussian_data_have_its_mean_and_covariance(name, steps, options, tol):
    x = SAMPLERS[name](_predict(), SCHEDULE, _noise(8000, 3), steps, generator=_gen(), **options)
    # the mean within 5 standard errors (0.5 / sqrt(8000) = 0.0056) plus discretisation
    assert torch.allclose(x.mean(0), GAUSS.mean(), atol=0.03), x.mean(0)
    assert torch.allclose(torch.cov(x.T), GAUSS.covariance(), atol=tol), torch.cov(x.T)


def test_stochastic_samplers_reach_the_mixture_within_the_two_sample_floor():
    exact = MIX.sample(4000, _gen(1))
    floor = sum(sliced_w2(MIX.sample(4000, _gen(10 + k)), exact, 128) for k in range(4)) / 4
    for name in STOCHASTIC:
        x = SAMPLERS[name](_predict(MIX), SCHEDULE, _noise(4000, 2, seed=3), 50, generator=_gen(2))
        assert sliced_w2(x, exact, 128) < 1.5 * floor, (name, sliced_w2(x, exact, 128), floor)
        frac = torch.bincount(torch.cdist(x, MIX.means).argmin(1), minlength=8).double() / len(x)
        assert torch.allclose(frac, MIX.weights, atol=0.02), (name, frac)  # mode weights 1/36 .. 8/36


def test_stochastic_samplers_draw_fresh_noise():
    x_T = _noise(16, 3)
    for name in STOCHASTIC:
        a = SAMPLERS[name](_predict(), SCHEDULE, x_T, 30, generator=_gen(1))
        b = SAMPLERS[name](_predict(), SCHEDULE, x_T, 30, generator=_gen(2))
        c = SAMPLERS[name](_predict(), SCHEDULE, x_T, 30, generator=_gen(1))
        assert torch.equal(a, c) and not torch.allclose(a, b), name
        assert SAMPLER_SPECS[name].stochastic


@pytest.mark.parametrize("name", [n for n in SAMPLER_SPECS if n != "student"])  # student: per method
def test_a_sampler_draws_fresh_noise_exactly_when_its_spec_says_stochastic(name):
    x_T = _noise(8, 3)
    a, b = (SAMPLERS[name](_predict(), SCHEDULE, x_T, 20, generator=_gen(seed)) for seed in (1, 2))
    assert (not torch.equal(a, b)) == SAMPLER_SPECS[name].stochastic
    assert not hasattr(SAMPLER_SPECS[name].fn, "stochastic")  # the spec is the one place it is written


# --- identities with the deterministic solvers ---------------------------------------------------------

@pytest.mark.parametrize("steps,timesteps", [(12, "logsnr"), (20, "karras"), (7, "uniform")])
def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m(steps, timesteps):
    x_T = _noise(64, 2, seed=steps)
    want = SAMPLERS["dpmpp_2m"](_predict(MIX), SCHEDULE, x_T, steps, timesteps=timesteps)
    got = SAMPLERS["dpmpp_2m_sde"](_predict(MIX), SCHEDULE, x_T, steps, timesteps=timesteps, eta=0.0,
                                   generator=_gen())
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # the exact-integral ("heun") variant of the second-order term is another solver, not the same one
    other = SAMPLERS["dpmpp_2m_sde"](_predict(MIX), SCHEDULE, x_T, steps, timesteps=timesteps, eta=0.0,
                                     solver_type="heun")
    assert rmse(other, want) > 1e-6


def test_dpmpp_2m_sde_noise_window_is_the_ode_outside_it():
    x_T, steps = _noise(64, 2, seed=4), 12
    sig = sigmas_for(SCHEDULE, resolve_timesteps("logsnr", SCHEDULE, steps)).tolist()  # VE levels, largest first

    def run(**kw):
        seen = []
        x = SAMPLERS["dpmpp_2m_sde"](_predict(MIX), SCHEDULE, x_T, steps, generator=_gen(), **kw,
                                     callback=lambda k, x, x0: seen.append(x))
        return x, seen

    ode, ode_path = run(eta=0.0)
    # a window no step starts in: exactly the ODE; one every step starts in: exactly the full SDE
    assert torch.equal(run(s_tmin=10 * sig[0])[0], ode)
    assert torch.equal(run(s_tmin=0.0, s_tmax=2 * sig[0])[0], run()[0])
    # noise only below sigma = sig[5]: the first five steps are the ODE's, bit for bit; then it differs
    low, low_path = run(s_tmax=sig[5])
    assert all(torch.equal(a, b) for a, b in zip(low_path[:5], ode_path[:5]))
    assert rmse(low_path[5], ode_path[5]) > 1e-3 and rmse(low, ode) > 1e-3
    with pytest.raises(ConfigError, match="s_tmax must be a number >= s_tmin"):
        run(s_tmin=1.0, s_tmax=0.5)


def test_dpmpp_2m_sde_with_a_noise_window_keeps_the_marginals():
    # every eta has the data's marginals in continuous time, so switching eta mid-way keeps them too
    for window in ({"s_tmax": 1.0}, {"s_tmin": 1.0}):
        x = SAMPLERS["dpmpp_2m_sde"](_predict(), SCHEDULE, _noise(8000, 3), 50, generator=_gen(), **window)
        assert torch.allclose(x.mean(0), GAUSS.mean(), atol=0.03), (window, x.mean(0))
        assert torch.allclose(torch.cov(x.T), GAUSS.covariance(), atol=0.03), (window, torch.cov(x.T))


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_restart_with_zero_restarts_is_its_ode_solver(solver):
    x_T = _noise(64, 2, seed=5)
    for steps in (9, 20):
        want = SAMPLERS[solver](_predict(MIX), SCHEDULE, x_T, steps)
        got = SAMPLERS["restart"](_predict(MIX), SCHEDULE, x_T, steps, restarts=0, solver=solver, generator=_gen())
        assert torch.equal(got, want)
    # with restarts the main solve is shorter and noise is added: a different sample
    assert not torch.allclose(SAMPLERS["restart"](_predict(MIX), SCHEDULE, x_T, 50, generator=_gen()),
                              SAMPLERS[solver](_predict(MIX), SCHEDULE, x_T, 50), atol=1e-3)


def test_restart_spends_the_stated_evaluations():
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x, t, y=None):
            calls.append(1)
            return ExactDenoiser(GAUSS, SCHEDULE)(x, t)

    for steps, want in [(50, 49), (20, 19), (10, 9), (5, 5)]:
        calls.clear()
        seen = []
        SAMPLERS["restart"](ModelPredictor(Counting(), SCHEDULE), SCHEDULE, _noise(4, 3), steps, generator=_gen(),
                            callback=lambda k, x, x0: seen.append(k))
        # 50 NFE: 2 restarts of 3 Heun steps (12) + 19 main levels (37); 10 or 5 NFE cannot pay for a restart
        assert len(calls) == want, (steps, len(calls))
        assert len(seen) == SAMPLER_SPECS["restart"].levels(steps)


def test_edm_without_churn_is_the_deterministic_heun_sampler():
    x_T = _noise(64, 2, seed=6)
    want = SAMPLERS["heun"](_predict(MIX), SCHEDULE, x_T, 39)
    assert torch.equal(SAMPLERS["edm"](_predict(MIX), SCHEDULE, x_T, 39, s_churn=0.0, generator=_gen()), want)
    assert not torch.allclose(SAMPLERS["edm"](_predict(MIX), SCHEDULE, x_T, 39, generator=_gen()), want, atol=1e-3)


def test_bad_options_of_the_stochastic_samplers_are_config_errors():
    p, x = _predict(), _noise(2, 3)
    with pytest.raises(ConfigError, match="eta must be"):
        SAMPLERS["dpmpp_2m_sde"](p, SCHEDULE, x, 10, eta=-1.0)
    with pytest.raises(ConfigError, match="solver_type must be 'midpoint' or 'heun'"):
        SAMPLERS["dpmpp_2m_sde"](p, SCHEDULE, x, 10, solver_type="rk4")
    with pytest.raises(ConfigError, match="0 < s_min < s_max"):
        SAMPLERS["restart"](p, SCHEDULE, x, 30, s_min=1.0, s_max=0.5)
    with pytest.raises(ConfigError, match="restarts must be an integer"):
        SAMPLERS["restart"](p, SCHEDULE, x, 30, restarts=-1)
    with pytest.raises(ConfigError, match="between 1 and 1000"):
        SAMPLERS["restart"](p, SCHEDULE, x, 0)
    with pytest.raises(ConfigError, match="deterministic"):
        SAMPLER_SPECS["edm"].check_step_schedule("optimized")


# --- dynamic thresholding -------------------------------------------------------------------------

def test_dynamic_threshold_clips_at_the_percentile_and_rescales():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.0, -0.25], [0.1, 0.2, -0.3, 0.4, 0.9]], dtype=torch.float64)
    out = dynamic_threshold(x0, 0.75)
    # row 0: |x0| = .5, 3, 2, 1, .25 -> the 0.75 quantile (linear) is 2.0 > 1: clip to [-2, 2], divide by 2
    assert torch.allclose(out[0], torch.tensor([0.25, -1.0, 1.0, 0.5, -0.125], dtype=torch.float64))
    assert torch.equal(out[1], x0[1])  # row 1: quantile 0.4 <= 1, unchanged
    assert torch.equal(dynamic_threshold(x0, 1.0, c=10.0), x0)  # p = 1 within a wide range: nothing happens
    assert torch.allclose(dynamic_threshold(x0, 1.0)[0], x0[0] / 3)  # p = 1: the sample rescaled into [-1, 1]
    for p in (0.0, 1.5, True):
        with pytest.raises(ConfigError, match="must be in \\(0, 1\\]"):
            dynamic_threshold(x0, p)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc", "heun", "dpmpp_2m_sde", "restart", "edm", "ddpm"])
def test_threshold_option_with_wide_bounds_changes_nothing_and_otherwise_bounds_x0(name):
    x_T = _noise(32, 2, seed=7)
    wide = ModelPredictor(ExactDenoiser(MIX, SCHEDULE), SCHEDULE, "eps", clip_x0=1e6)
    plain = SAMPLERS[name](_predict(MIX), SCHEDULE, x_T, 20, generator=_gen())
    same = SAMPLERS[name](wide, SCHEDULE, x_T, 20, generator=_gen(), threshold=1.0)
    assert torch.allclose(same, plain, rtol=0, atol=1e-9)
    seen = []
    SAMPLERS[name](_predict(MIX), SCHEDULE, 3 * x_T, 20, generator=_gen(), threshold=0.5,
                   callback=lambda k, x, x0: seen.append(x0.abs().max()))
    assert max(seen) <= 1.0 + 1e-12  # the mixture's modes lie on the unit circle: x0 kept within [-1, 1]
    assert max(seen) > 0.9


# --- the ODE-error metric ---------------------------------------------------------------------------

def _correlated_gaussian():
    a = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.3, 0.1], [0.1, 0.0, 0.05]], dtype=torch.float64)
    return Gaussian([1.0, -0.5, 0.25], a @ a.T + 1e-3 * torch.eye(3, dtype=torch.float64))


def _closed_form_flow(g, x_T):
    # VE view x = x_t / sqrt(abar): dx/dsigma = (x - D) / sigma with D = mu + Sigma (Sigma + sigma^2)^-1 (x - mu),
    # so along each eigenvector of Sigma (eigenvalue l) x - mu grows as sqrt(l + sigma^2); the solvers' last
    # step, x0 = D(x, sigma(0)), then multiplies by l / (l + sigma(0)^2)
    ls = log_sigmas(SCHEDULE)
    s_max, s_min = float(ls[-1].exp()), float(ls[0].exp())
    lam, u = g.eigvals, g.eigvecs
    z = (x_T * math.sqrt(1 + s_max**2) - g.mu) @ u
    z = z * ((lam + s_min**2) / (lam + s_max**2)).sqrt()
    return g.mu + (z * lam / (lam + s_min**2)) @ u.T


def test_reference_flow_matches_the_closed_form_gaussian_flow():
    g = _correlated_gaussian()
    x_T = _noise(16, 3, seed=8)
    ref = reference_flow(_predict(g), SCHEDULE, x_T, 1000)
    assert (ref - _closed_form_flow(g, x_T)).abs().max() < 1e-4
    assert rmse(ref, _closed_form_flow(g, x_T)) < 1e-8  # measured 5e-10
    coarse = reference_flow(_predict(g), SCHEDULE, x_T, 50)
    assert rmse(coarse, ref) > 1e-7  # the check can fail: 50 RK4 steps are measurably off


def test_ode_error_orders_and_table_on_the_exact_gaussian():
    g = _correlated_gaussian()
    predict = _predict(g)
    res = ode_errors(predict, SCHEDULE, _noise(32, 3, seed=9), ["ddim", "dpmpp_2m", "unipc"], [10, 20, 40, 80],
                     reference_steps=200, log=lambda s: None)
    assert res.reference_gap < 1e-6
    assert 0.7 < res.order("ddim", 20) < 1.3  # DDIM is first order
    assert 1.6 < res.order("dpmpp_2m", 20) < 2.5  # DPM-Solver++(2M) second
    assert res.order("unipc", 20) > 2.4  # UniPC-2 with the corrector third
    assert convergence_order([10, 100], [1.0, 0.01]) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="deterministic solver"):
        ode_errors(predict, SCHEDULE, _noise(2, 3), ["edm"], [5], reference_steps=2, log=lambda s: None)


def test_diffusers_schedulers_are_driven_on_the_same_flow():
    pytest.importorskip("diffusers")
    g = _correlated_gaussian()
    model = ExactDenoiser(g, SCHEDULE)
    x_T = _noise(32, 3, seed=10)
    ref = reference_flow(_predict(g), SCHEDULE, x_T, 200)
    # diffusers' DDIM on its "leading" steps is our DDIM on the same steps, and both converge to the flow
    ours = SAMPLERS["ddim"](_predict(g), SCHEDULE, x_T, 20, spacing="leading")
    assert torch.allclose(diffusers_flow("diffusers DDIM", model, SCHEDULE, x_T, 20), ours, atol=1e-5)
    for name in ("diffusers Euler", "diffusers Heun", "diffusers UniPC"):
        errs = [rmse(diffusers_flow(name, model, SCHEDULE, x_T, k), ref) for k in (10, 40)]
        assert errs[1] < 0.5 * errs[0], (name, errs)


# --- the run's recommended sampler ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ddpmlab.cli import main

    root = tmp_path_factory.mktemp("runs")
    tiny = ["train.steps=20", "mlp.hidden=32", "train.batch_size=64", "data.toy_samples=500", "train.sample_n=16",
            "train.sample_steps=5", "train.log_every=10", "train.save_every=20", "train.warmup_steps=5"]
    assert main(["train", "--config", "toy2d", f"train.out_dir={root}", "train.name=r", "--no-progress", *tiny]) == 0
    return root / "r"


def test_bench_records_the_best_sampler_and_sample_uses_it(tiny_run, tmp_path, capsys):
    import numpy as np

    from ddpmlab.cli import main
    from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request

    run = load_run(tiny_run, device="cpu")
    # no recommendation yet: the run's own sampler and steps (toy2d: ddpm; train.sample_steps=5), said in one line
    said = []
    plan = plan_request(run, SamplingRequest(cycle_classes=False), log=said.append)
    assert (plan.sampler, plan.steps) == ("ddpm", 5) and "train.sample_sampler" in said[0]
    assert plan_request(run, SamplingRequest(None, 7, cycle_classes=False), log=said.append).steps == 7
    with pytest.raises(ConfigError, match="ddpm takes uniform, leading, trailing, not 'karras'"):
        plan_request(run, SamplingRequest(step_schedule="karras", cycle_classes=False), log=said.append)
    assert main(["bench", "samplers", str(tiny_run), "--samplers", "ddim,dpmpp_2m:karras,edm", "--nfe", "3,6",
                 "--n", "8", "--reference-steps", "10", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rec = json.loads((tiny_run / "recommended_samplers.json").read_text())
    bench = json.loads((tmp_path / "sampler_bench.json").read_text())
    for k in ("3", "6"):
        errs = {label: e[k] for label, e in bench["errors"].items()}
        best = min(errs, key=errs.get)
        got = rec["by_nfe"][k]["sampler"] + (f":{rec['by_nfe'][k]['timesteps']}" if rec["by_nfe"][k]["timesteps"]
                                             else "")
        assert got == best and rec["by_nfe"][k]["error_ratio"] == pytest.approx(errs[best] / bench["floor"])
    capsys.readouterr()
    # no --sampler: the recommendation for the largest benchmarked NFE <= --steps
    out = tmp_path / "s.png"
    assert main(["sample", str(tiny_run), "--n", "4", "--steps", "6", "--seed", "2", "--out", str(out), "--npz",
                 "--device", "cpu", "--no-progress"]) == 0
    want = rec["by_nfe"]["6"]
    assert f"sampler: {want['sampler']}" in capsys.readouterr().out
    plan = plan_request(run, SamplingRequest(want["sampler"], 6, want["timesteps"], n=4, cycle_classes=False),
                        log=lambda m: None)
    expect = draw_samples(run, plan, 4, seed=2, progress=False)
    got = torch.from_numpy(np.load(out.with_suffix(".npz"))["samples"])
    assert torch.allclose(got, expect, atol=1e-6)
    # a named --sampler wins; a damaged file is ignored with a warning (the default again)
    assert plan_request(run, SamplingRequest("ddim", 6, cycle_classes=False), log=lambda m: None).sampler == "ddim"
    (tiny_run / "recommended_samplers.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring"):
        assert plan_request(run, SamplingRequest(cycle_classes=False), log=lambda m: None).sampler == "ddpm"
