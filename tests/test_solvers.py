"""High-order solvers, step schedules, Langevin predictor-corrector and the sampler benchmark,
checked against exact scores of Gaussian (mixture) data, closed-form ODE solutions and diffusers."""

import math

import pytest
import torch

from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t, log_sigmas, select_timesteps, sigma_of_t, t_of_sigma
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.bench import BenchEntry, bench_analytic, markdown_table, mixture2d, parse_nfes, save, sliced_w2
from ddpmlab.samplers import ModelPredictor, solvers
from ddpmlab.samplers.langevin import langevin_step
from ddpmlab.samplers.registry import SAMPLERS, check_timesteps_name, get_sampler
from ddpmlab.samplers.steps import (
    STEP_SCHEDULES,
    optimize_timesteps,
    resolve_timesteps,
    sigmas_for,
)

SCHEDULE = NoiseSchedule.make("linear", 1000)
MIX = mixture2d()  # 8 modes on the unit circle, std 0.1, unequal weights
GAUSS = GaussianMixture(means=[[1.0, -0.5, 0.25]], stds=[0.5])
ODE_SOLVERS = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _predict(data=MIX, schedule=SCHEDULE):
    return ModelPredictor(ExactDenoiser(data, schedule), schedule, "eps")


def _noise(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rms(a, b):
    return float((a - b).pow(2).sum(1).mean().sqrt())


@pytest.fixture(scope="module")
def flow_reference():
    """x_T and the exact probability-flow endpoint (3M with 500 NFE; Heun with 999 agrees to ~1e-4)."""
    x_T = _noise(1000, 2)
    return x_T, SAMPLERS["dpmpp_3m"](_predict(), SCHEDULE, x_T, 500)


# --- continuous time ------------------------------------------------------------------------

def test_fractional_time_interpolates_log_sigma_and_inverts():
    ls = log_sigmas(SCHEDULE)
    t_int = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.allclose(sigma_of_t(SCHEDULE, t_int).log(), ls[t_int.long()], atol=1e-12)
    assert torch.allclose(abar_of_t(SCHEDULE, t_int), SCHEDULE.alphas_cumprod[t_int.long()], rtol=1e-12)
    t = torch.tensor([0.25, 10.5, 499.9, 998.75], dtype=torch.float64)
    lo = t.floor().long()
    w = t - lo
    assert torch.allclose(sigma_of_t(SCHEDULE, t).log(), (1 - w) * ls[lo] + w * ls[lo + 1], atol=1e-12)
    assert torch.allclose(t_of_sigma(SCHEDULE, sigma_of_t(SCHEDULE, t)), t, atol=1e-9)


def test_predictor_at_fractional_t_uses_the_interpolated_noise_level():
    predict = _predict(GAUSS)
    x = _noise(8, 3)
    eps_int, x0_int = predict(x, torch.tensor(321))
    eps_f, x0_f = predict(x, torch.tensor(321.0, dtype=torch.float64))
    assert torch.allclose(eps_int, eps_f, atol=1e-12) and torch.allclose(x0_int, x0_f, atol=1e-12)
    t = torch.tensor(321.4, dtype=torch.float64)
    abar = float(abar_of_t(SCHEDULE, t))
    eps, x0 = predict(x, t)
    # exact eps* of N(mu, s^2 I) at that abar: sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar)
    want = math.sqrt(1 - abar) * (x - math.sqrt(abar) * GAUSS.means[0]) / (abar * 0.25 + 1 - abar)
    assert torch.allclose(eps, want, atol=1e-12)
    assert torch.allclose(x0, (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar), atol=1e-12)


# --- step schedules ---------------------------------------------------------------------------

def test_step_schedules_follow_their_definitions():
    n = 12
    ls = log_sigmas(SCHEDULE)
    smin, smax = float(ls[0].exp()), float(ls[-1].exp())
    karras = sigma_of_t(SCHEDULE, resolve_timesteps("karras", SCHEDULE, n))
    root = karras ** (1 / 7)  # Karras et al. 2022, Eq. 5: sigma^(1/rho) is linear in i
    assert torch.allclose(root[1:] - root[:-1], (root[-1] - root[0]) / (n - 1) * torch.ones(n - 1, dtype=torch.float64), atol=1e-9)
    assert math.isclose(float(karras[0]), smax, rel_tol=1e-9) and math.isclose(float(karras[-1]), smin, rel_tol=1e-9)
    lam = -sigma_of_t(SCHEDULE, resolve_timesteps("logsnr", SCHEDULE, n)).log()
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]) / (n - 1) * torch.ones(n - 1, dtype=torch.float64), atol=1e-9)
    for spacing in ("uniform", "leading", "trailing"):
        assert torch.equal(resolve_timesteps(spacing, SCHEDULE, n).long(), select_timesteps(1000, n, spacing).flip(0))
    lin = resolve_timesteps("linspace", SCHEDULE, 10)
    assert lin.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]  # diffusers' default spacing
    for name in STEP_SCHEDULES:
        if name != "optimized":
            ts = resolve_timesteps(name, SCHEDULE, 7)
            assert len(ts) == 7 and bool((ts[1:] < ts[:-1]).all()) and ts.min() >= 0 and ts.max() <= 999
    assert sigmas_for(SCHEDULE, lin)[-1] == 0


def test_optimized_schedule_lowers_the_error_on_fresh_noise(flow_reference):
    x_T, ref = flow_reference
    predict = _predict()
    ts = optimize_timesteps(predict, SCHEDULE, SAMPLERS["dpmpp_3m"], 5, _noise(500, 2, seed=7), reference_steps=100)
    tuned = _rms(SAMPLERS["dpmpp_3m"](predict, SCHEDULE, x_T, 5, timesteps=ts), ref)
    plain = _rms(SAMPLERS["dpmpp_3m"](predict, SCHEDULE, x_T, 5, timesteps="logsnr"), ref)
    assert tuned < 0.7 * plain, (tuned, plain)


# --- solvers against the exact flow --------------------------------------------------------------

@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_ode_solvers_converge_to_the_exact_flow(name, flow_reference):
    x_T, ref = flow_reference
    errs = [_rms(SAMPLERS[name](_predict(), SCHEDULE, x_T, k), ref) for k in (10, 20, 50)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < (0.015 if name in ("dpmpp_2m", "dpmpp_3m", "unipc") else 0.06), errs


def test_high_order_solvers_beat_ddim_at_10_and_20_nfe(flow_reference):
    x_T, ref = flow_reference
    exact = MIX.sample(4000, torch.Generator().manual_seed(1))
    x_T4 = _noise(4000, 2, seed=2)
    for k in (10, 20):
        ddim = _rms(SAMPLERS["ddim"](_predict(), SCHEDULE, x_T, k), ref)
        ddim_sw = sliced_w2(SAMPLERS["ddim"](_predict(), SCHEDULE, x_T4, k), exact)
        for name in ("dpmpp_2m", "dpmpp_3m", "unipc"):
            err = _rms(SAMPLERS[name](_predict(), SCHEDULE, x_T, k), ref)
            assert err < 0.6 * ddim, (name, k, err, ddim)  # trajectory error against the exact flow
            sw = sliced_w2(SAMPLERS[name](_predict(), SCHEDULE, x_T4, k), exact)
            assert sw < 0.8 * ddim_sw, (name, k, sw, ddim_sw)  # and distance to exact samples


@pytest.mark.parametrize("name,steps,options", [
    ("euler", 100, {}), ("heun", 99, {}), ("dpmpp_2m", 25, {}), ("dpmpp_3m", 25, {}), ("unipc", 25, {}),
    ("euler", 300, {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ("heun", 99, {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ("pc", 400, {"snr": 0.1}),
    ("pc", 200, {"predictor": "ancestral", "corrector_steps": 1}),
])
def test_samples_of_gaussian_data_have_its_mean_and_covariance(name, steps, options):
    n = 8000
    x = SAMPLERS[name](_predict(GAUSS), SCHEDULE, _noise(n, 3), steps, generator=torch.Generator().manual_seed(1),
                       **options)
    # 5 standard errors of the mean (0.5 / sqrt(n) = 0.0056) plus discretisation
    assert torch.allclose(x.mean(0), GAUSS.mean(), atol=0.03)
    assert torch.allclose(torch.cov(x.T), GAUSS.covariance(), atol=0.03), torch.cov(x.T)


@pytest.mark.parametrize("name,steps,options", [("dpmpp_3m", 20, {}), ("unipc", 20, {}), ("heun", 39, {}),
                                                ("pc", 400, {"snr": 0.1})])
def test_mixture_modes_get_their_weights(name, steps, options):
    x = SAMPLERS[name](_predict(), SCHEDULE, _noise(8000, 2, seed=3), steps,
                       generator=torch.Generator().manual_seed(2), **options)
    d = torch.cdist(x, MIX.means)
    frac = torch.bincount(d.argmin(1), minlength=8).double() / len(x)
    assert torch.allclose(frac, MIX.weights, atol=0.02), frac  # weights 1/36 .. 8/36
    assert d.min(1).values.median() < 0.16  # on the modes: median of |N(0, 0.1^2 I_2)| is 0.118


def test_churn_makes_euler_stochastic_and_adds_the_stated_noise():
    predict = _predict(GAUSS)
    x_T = _noise(16, 3)
    a = SAMPLERS["euler"](predict, SCHEDULE, x_T, 10, generator=torch.Generator().manual_seed(1), s_churn=5.0)
    b = SAMPLERS["euler"](predict, SCHEDULE, x_T, 10, generator=torch.Generator().manual_seed(2), s_churn=5.0)
    c = SAMPLERS["euler"](predict, SCHEDULE, x_T, 10, generator=torch.Generator().manual_seed(1))
    d = SAMPLERS["euler"](predict, SCHEDULE, x_T, 10, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b) and torch.equal(c, d)
    # Karras et al. 2022, Alg. 2: gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0
    assert solvers.churn_gamma(1.0, 10, 5.0, 0.0, math.inf, 100.0) == pytest.approx(math.sqrt(2) - 1)
    assert solvers.churn_gamma(1.0, 10, 1.0, 0.0, math.inf, 100.0) == pytest.approx(0.1)
    assert solvers.churn_gamma(1.0, 10, 1.0, 2.0, math.inf, 100.0) == 0.0
    assert solvers.churn_gamma(90.0, 10, 5.0, 0.0, math.inf, 100.0) == pytest.approx(100 / 90 - 1)
    x = torch.zeros(200000, 1, dtype=torch.float64)
    x_hat, s_hat = solvers.churn(x, 2.0, 0.25, 0.9, torch.Generator().manual_seed(0))
    assert s_hat == 2.5
    assert float(x_hat.std()) == pytest.approx(0.9 * math.sqrt(2.5**2 - 2.0**2), rel=0.01)


# --- the update formulas against closed-form solutions --------------------------------------------

def _exact_linear_ode(m, x_s, l_s, l_t):
    """dx/dlambda = m(lambda) - x for a polynomial m (coefficients, low first), solved in closed form."""
    # particular solution p with p' + p = m: p = sum_k (-1)^j m^{(j)}, then x = p + (x_s - p(l_s)) e^{-(l - l_s)}
    def p(l):
        total, deriv = 0.0, list(m)
        sign = 1.0
        while deriv:
            total += sign * sum(c * l**i for i, c in enumerate(deriv))
            deriv = [i * c for i, c in enumerate(deriv)][1:]
            sign = -sign
        return total
    return p(l_t) + (x_s - p(l_s)) * math.exp(-(l_t - l_s))


def test_third_order_updates_integrate_quadratic_x0_exactly():
    # in lambda = -log sigma the flow is dx/dlambda = D - x; with D a quadratic polynomial in lambda a
    # third-order multistep update must be exact (the widely used 3M code is off by half its D'' term)
    poly = [0.3, 0.7, -0.9]
    m = lambda l: sum(c * l**i for i, c in enumerate(poly))  # noqa: E731
    lam = [-1.2, -0.7, -0.4]  # past evaluations, newest last
    l_t, x_s = 0.3, torch.tensor([1.1], dtype=torch.float64)
    want = _exact_linear_ode(poly, 1.1, lam[-1], l_t)
    h = l_t - lam[-1]
    hist = [torch.tensor([m(v)], dtype=torch.float64) for v in reversed(lam)]
    got = solvers._dpmpp_update(x_s, h, hist, [lam[2] - lam[1], lam[1] - lam[0]])
    assert float(got) == pytest.approx(want, abs=1e-12)
    # UniPC: the predictor with p = 3 points and the corrector with 2 past points + the new one
    rs = [(lam[1] - lam[2]) / h, (lam[0] - lam[2]) / h]
    got = solvers._unipc_combine(x_s, h, hist[0], [hist[1] - hist[0], hist[2] - hist[0]], rs)
    assert float(got) == pytest.approx(want, abs=1e-12)
    m_t = torch.tensor([m(l_t)], dtype=torch.float64)
    got = solvers._unipc_combine(x_s, h, hist[0], [hist[1] - hist[0], m_t - hist[0]], [rs[0], 1.0])
    assert float(got) == pytest.approx(want, abs=1e-12)


def test_dpmpp_2m_matches_diffusers_step_for_step():
    diffusers = pytest.importorskip("diffusers")
    predict = _predict()
    model = predict.model
    for nfe in (5, 12, 20):
        sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      solver_order=2, algorithm_type="dpmsolver++",
                                                      lower_order_final=True, final_sigmas_type="zero")
        sched.set_timesteps(nfe)
        x_T = _noise(64, 2, seed=nfe)
        x, theirs = x_T.clone(), []
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
            theirs.append(x.double())
        ours = []
        out = SAMPLERS["dpmpp_2m"](predict, SCHEDULE, x_T, nfe, timesteps=sched.timesteps.double(),
                                   callback=lambda k, x, x0: ours.append(x))
        assert len(ours) == len(theirs) == nfe
        for a, b in zip(ours, theirs):  # their sigmas and steps are float32
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert torch.allclose(out, theirs[-1], atol=1e-5)


# --- Langevin corrector ---------------------------------------------------------------------

def test_langevin_corrector_keeps_the_marginal_it_targets():
    # x ~ q(x_t) exactly; Langevin steps with the exact score of q(x_t) must leave its moments alone
    t = 300
    abar = float(SCHEDULE.alphas_cumprod[t])
    var = abar * 0.25 + 1 - abar
    mean = math.sqrt(abar) * GAUSS.means[0]
    x = mean + math.sqrt(var) * _noise(20000, 3, seed=4)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        score = -(x - mean) / var
        x = langevin_step(score, x, 1 - float(SCHEDULE.betas[t]), 0.1, g)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), var * torch.eye(3, dtype=torch.float64), atol=0.05 * var)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun", "pc"])
def test_bad_steps_and_timesteps_are_clear_config_errors(name):
    fn, predict, x = SAMPLERS[name], _predict(GAUSS), _noise(2, 3)
    for steps in (0, -3, 1001):
        with pytest.raises(ConfigError, match="between 1 and 1000"):
            fn(predict, SCHEDULE, x, steps)
    with pytest.raises(ConfigError, match="unknown timesteps 'karas'; did you mean 'karras'"):
        fn(predict, SCHEDULE, x, 10, timesteps="karas")
    with pytest.raises(ConfigError, match="optimize_timesteps"):
        fn(predict, SCHEDULE, x, 10, timesteps="optimized")


def test_explicit_timesteps_must_decrease_within_the_grid():
    predict, x = _predict(GAUSS), _noise(2, 3)
    with pytest.raises(ConfigError, match="decrease strictly"):
        SAMPLERS["dpmpp_2m"](predict, SCHEDULE, x, 3, timesteps=[10.0, 500.0, 999.0])
    with pytest.raises(ConfigError, match="decrease strictly"):
        SAMPLERS["unipc"](predict, SCHEDULE, x, 2, timesteps=[1200.0, 5.0])
    with pytest.raises(ConfigError, match="3 values given for 4"):
        SAMPLERS["euler"](predict, SCHEDULE, x, 4, timesteps=[900.0, 500.0, 5.0])


def test_unknown_names_in_the_cli_are_one_line_errors(capsys):
    from ddpmlab.cli import main

    with pytest.raises(ConfigError, match="did you mean 'dpmpp_2m'"):
        get_sampler("dpmpp2m")
    with pytest.raises(ConfigError, match="ddim takes uniform, leading, trailing, not .karras."):
        check_timesteps_name("ddim", "karras")
    assert main(["sample", "no-such-run", "--sampler", "unipc", "--timesteps", "logsrn"]) == 2
    assert "unknown schedule 'logsrn'; did you mean 'logsnr'" in capsys.readouterr().err
    assert main(["bench", "samplers", "--analytic", "mixture2d", "--samplers", "ddim,dpm"]) == 2
    assert "unknown sampler 'dpm'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^nfe must be") as e:  # the caller names the option where it catches
        parse_nfes("5,x")
    assert e.value.named({"nfe": "--nfe"}).startswith("--nfe must be")
    assert main(["bench", "samplers", "--analytic", "mixture2d", "--nfe", "5,x"]) == 2
    assert "--nfe must be a comma-separated list" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ddim takes uniform"):
        BenchEntry.parse("ddim:karras")
    with pytest.raises(ConfigError, match="deterministic"):
        BenchEntry.parse("pc:optimized")
    with pytest.raises(ConfigError, match="deterministic"):
        optimize_timesteps(_predict(GAUSS), SCHEDULE, SAMPLERS["euler"], 5, _noise(4, 3), s_churn=1.0)


# --- the benchmark ----------------------------------------------------------------------------

def test_sliced_w2_of_a_translation_is_its_length_over_sqrt_d():
    x = _noise(200, 4, seed=6)
    c = torch.tensor([0.3, -0.4, 0.0, 1.2], dtype=torch.float64)
    assert sliced_w2(x, x) == 0.0
    # W2 between a set and its translate along theta is |theta . c|; E (theta . c)^2 = |c|^2 / D
    assert sliced_w2(x + c, x, projections=8000) == pytest.approx(float(c.norm()) / 2, rel=0.03)


def test_bench_ranks_samplers_against_exact_samples(tmp_path):
    specs = [BenchEntry.parse(s) for s in ("ddim", "dpmpp_3m:logsnr")]
    res = bench_analytic("mixture2d", specs, [3, 25], n=3000, log=lambda s: None)
    assert res.floor > 0
    for label in ("ddim", "dpmpp_3m:logsnr"):
        assert res.errors[label][25] < res.errors[label][3]
    assert res.ratio("dpmpp_3m:logsnr", 25) < 3  # close to the two-sample floor
    paths = save(res, tmp_path)
    assert [p.name for p in paths] == ["sampler_bench.md", "sampler_bench.png", "sampler_bench.json"]
    assert "| dpmpp_3m:logsnr |" in markdown_table(res) and paths[1].stat().st_size > 1000


# --- the command line on a tiny trained 2-D run ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ddpmlab.cli import main

    root = tmp_path_factory.mktemp("runs")
    tiny = ["train.steps=30", "mlp.hidden=32", "train.batch_size=64", "data.toy_samples=500", "train.sample_n=16",
            "train.sample_steps=5", "train.log_every=10", "train.save_every=30", "train.warmup_steps=5"]
    assert main(["train", "--config", "toy2d", f"train.out_dir={root}", "train.name=r", "--no-progress", *tiny]) == 0
    return root / "r"


def test_sample_cli_passes_the_step_schedule_to_the_solver(tiny_run, tmp_path):
    import numpy as np

    from ddpmlab.cli import main
    from ddpmlab.io.checkpoint import load_model

    out = tmp_path / "g.png"
    assert main(["sample", str(tiny_run), "--n", "4", "--sampler", "unipc", "--steps", "6", "--timesteps", "karras",
                 "--seed", "3", "--out", str(out), "--npz", "--device", "cpu"]) == 0
    got = torch.from_numpy(np.load(out.with_suffix(".npz"))["samples"])
    cfg, model = load_model(tiny_run)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x_T = torch.randn((4, 2), generator=torch.Generator().manual_seed(3))  # generate(): seed + batch index
    predict = ModelPredictor(model, schedule, cfg.diffusion.prediction)
    with torch.no_grad():
        want = SAMPLERS["unipc"](predict, schedule, x_T, 6, timesteps="karras")
        other = SAMPLERS["unipc"](predict, schedule, x_T, 6)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, other, atol=1e-3)


def test_bench_cli_on_a_run_writes_table_plot_and_json(tiny_run, tmp_path, capsys):
    import json

    from ddpmlab.cli import main

    assert main(["bench", "samplers", str(tiny_run), "--samplers", "ddim,dpmpp_2m:optimized", "--nfe", "2,4",
                 "--n", "8", "--reference-steps", "10", "--out", str(tmp_path), "--device", "cpu"]) == 0
    data = json.loads((tmp_path / "sampler_bench.json").read_text())
    assert set(data["errors"]) == {"ddim", "dpmpp_2m:optimized"} and data["floor"] > 0
    assert all(math.isfinite(v) for errs in data["errors"].values() for v in errs.values())
    assert "| dpmpp_2m:optimized |" in (tmp_path / "sampler_bench.md").read_text()
    assert (tmp_path / "sampler_bench.png").stat().st_size > 1000
