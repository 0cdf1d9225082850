"""Training with learned variances: hybrid loss, min-SNR weighting, importance sampling, resume, NLL eval."""

import json

import pytest
import torch

from ddpmlab.config import load_config
from ddpmlab.diffusion.likelihood import LN2
from ddpmlab.diffusion.objectives import DiffusionObjective, ImportanceTimesteps, min_snr_weight
from ddpmlab.diffusion.process import eps_x0_from_output, training_target, x0_from_eps
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.nll import bound_terms, model_reverse

S = NoiseSchedule.make("linear", 1000)


pytestmark = pytest.mark.usefixtures("one_thread")


class Head(torch.nn.Module):
    """A tiny network with eps and variance outputs for (B, 2) points."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t.float()[:, None] / 1000], 1))


def _batch(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g) * 0.5
    return x0, torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 2, generator=g)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    w = model.net[2].weight.grad
    return w[:2].clone(), w[2:].clone()  # rows of the eps head, rows of the variance head


def test_hybrid_loss_trains_the_mean_by_l_simple_only_and_the_variance_by_l_vlb():
    model = Head()
    x0, t, noise = _batch()
    kw = dict(variance="learned_range", decoder="continuous")
    simple = DiffusionObjective(S, loss_type="simple", **kw)
    hybrid = DiffusionObjective(S, loss_type="hybrid", vlb_weight=0.001, **kw)
    vlb = DiffusionObjective(S, loss_type="vlb", **kw)
    g_mean_simple, g_var_simple = _grads(model, simple(model, x0, t=t, noise=noise))
    g_mean_hybrid, g_var_hybrid = _grads(model, hybrid(model, x0, t=t, noise=noise))
    g_mean_vlb, _ = _grads(model, vlb(model, x0, t=t, noise=noise))
    assert torch.equal(g_var_simple, torch.zeros_like(g_var_simple))
    # Nichol & Dhariwal 2021, Sec. 3.1: stop-gradient on the mean inside L_vlb
    assert torch.allclose(g_mean_hybrid, g_mean_simple, atol=1e-7, rtol=0)
    assert g_var_hybrid.abs().max() > 1e-4
    assert (g_mean_vlb - g_mean_simple).abs().max() > 1e-4  # without the stop-gradient the mean moves too


def test_vlb_loss_is_the_bound_estimated_one_t_at_a_time():
    # averaged over every t with the same x_t, T * L_t is the sum of the terms bound_terms computes
    model = Head()
    T = S.num_timesteps
    x0 = torch.randn(1, 2, generator=torch.Generator().manual_seed(1)).double().expand(T, 2)
    g = torch.Generator().manual_seed(2)
    terms, _ = bound_terms(model_reverse(lambda x, t, y: model(x.float(), t).double(), S, "eps", "learned_range"),
                           S, x0[:1], decoder="continuous", generator=g)
    g = torch.Generator().manual_seed(2)
    noise = torch.cat([torch.randn(1, 2, generator=g, dtype=torch.float64) for _ in range(T)])
    vlb = DiffusionObjective(S, loss_type="vlb", variance="learned_range", decoder="continuous")
    with torch.no_grad():
        loss = vlb(lambda x, t, y: model(x.float(), t).double(), x0, t=torch.arange(T), noise=noise)
    assert loss.item() == pytest.approx(terms.sum().item() / LN2, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error_for_every_parameterisation(gamma):
    # Hang et al. 2023: the weighted loss is min(SNR_t, gamma) ||x0 - x0_hat||^2 whatever the network predicts
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(200, 4, generator=g, dtype=torch.float64), torch.randn(200, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (200,), generator=g)
    eps_hat = noise + 0.1 * torch.randn(200, 4, generator=g, dtype=torch.float64)
    x_t = S.alphas_cumprod[t, None].sqrt() * x0 + (1 - S.alphas_cumprod[t, None]).sqrt() * noise
    x0_hat = x0_from_eps(S, x_t, t, eps_hat)
    snr = torch.exp(S.log_snr[t])
    expected = torch.clamp(snr, max=gamma) * (x0 - x0_hat).pow(2).mean(1)
    for pred in ("eps", "x0", "v"):
        out = training_target(S, x0_hat, t, eps_hat, pred)  # the same model, parameterised as `pred`
        assert torch.allclose(eps_x0_from_output(S, x_t, t, out, pred)[1], x0_hat, atol=1e-8)
        target = training_target(S, x0, t, noise, pred)
        weighted = min_snr_weight(S, t, gamma, pred).double() * (out - target).pow(2).mean(1)
        assert torch.allclose(weighted, expected, rtol=1e-5, atol=1e-12), pred


def test_importance_sampling_follows_the_loss_history_and_stays_unbiased():
    T = 20
    sampler = ImportanceTimesteps(T, history=10)
    assert torch.allclose(sampler.probs(), torch.full((T,), 1 / T, dtype=torch.float64))  # uniform until warm
    scale = torch.arange(1, T + 1, dtype=torch.float64)  # term t has |L_t| ~ t + 1
    g = torch.Generator().manual_seed(4)
    while not sampler.warm():
        t = sampler.sample(64, generator=g)
        sampler.update(t, scale[t] * (1 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)))
    p = sampler.probs()
    rms = sampler.history.pow(2).mean(1).sqrt()
    assert torch.allclose(p, 0.999 * rms / rms.sum() + 0.001 / T, rtol=1e-12)  # Eq. 18 (with a uniform floor)
    assert p[-1] > 10 * p[0]
    # E_{t~p}[w_t L_t] = mean_t L_t: exactly as a sum, and by drawing
    assert float((p * sampler.weights(torch.arange(T)).double() * scale).sum()) == pytest.approx(float(scale.mean()), rel=1e-6)
    t = sampler.sample(200000, generator=g)
    est = (sampler.weights(t).double() * scale[t]).mean()
    assert float(est) == pytest.approx(float(scale.mean()), rel=0.01)
    # the state round-trips through JSON: a restored sampler draws the same t
    clone = ImportanceTimesteps(T)
    clone.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert torch.equal(clone.sample(50, generator=torch.Generator().manual_seed(5)),
                       sampler.sample(50, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("overrides,match", [
    (["diffusion.variance=learned_range"], "needs diffusion.loss_type hybrid or vlb"),
    (["diffusion.loss_type=hybrid"], "set diffusion.variance=learned_range"),
    (["diffusion.variance=learned_range", "diffusion.loss_type=hybrid", "diffusion.t_sampling=importance"],
     "importance is for loss_type=vlb"),
    (["diffusion.loss_type=vlb", "diffusion.min_snr_gamma=5"], "min_snr_gamma"),
    (["diffusion.variance=learned"], "diffusion.variance"),
])
def test_inconsistent_likelihood_settings_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("toy2d", overrides)


def _toy_cfg(root, name, steps, extra=()):
    return load_config("toy2d", [f"train.out_dir={root}", f"train.name={name}", f"train.steps={steps}",
                                 "diffusion.num_timesteps=50", "train.batch_size=64", "train.save_every=5",
                                 "train.sample_n=16", "train.sample_steps=10", "train.sample_sampler=ddpm",
                                 "train.log_every=5", "mlp.hidden=32", "mlp.num_layers=1",
                                 "data.toy_samples=500", *extra])


VLB_IS = ["diffusion.variance=learned_range", "diffusion.loss_type=vlb", "diffusion.t_sampling=importance",
          "train.batch_size=128"]


def test_resumed_importance_sampling_run_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from ddpmlab.training.tasks.diffusion import train
    from ddpmlab.training.run_folder import resume_config

    # T = 50 and 128 per batch: the history is full (warm) before the stop at step 10
    train(_toy_cfg(tmp_path, "straight", 20, VLB_IS), progress=False)
    train(_toy_cfg(tmp_path, "stopped", 10, VLB_IS), progress=False)
    cfg = resume_config(tmp_path / "stopped", _toy_cfg(tmp_path, "stopped", 20, VLB_IS), ["train.steps"])
    train(cfg, run_dir=tmp_path / "stopped", resume=True, progress=False)
    a, b = (tmp_path / r / "checkpoints/step_0000020" for r in ("straight", "stopped"))
    for name in ("model", "ema"):
        wa, wb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (json.loads((c / "state.json").read_text())["objective"] for c in (a, b))
    assert sa == sb and min(sa["count"]) == 10  # the history was warm, and it was restored exactly
    mid = json.loads((tmp_path / "stopped/checkpoints/step_0000010/state.json").read_text())["objective"]
    assert min(mid["count"]) == 10 and mid != sa  # importance draws after the resume used the restored history


def test_ddpm_eval_nll_of_a_learned_variance_toy_run(tmp_path, capsys):
    from ddpmlab.cli import main
    from ddpmlab.training.tasks.diffusion import train

    run = train(_toy_cfg(tmp_path, "hyb", 10, ["diffusion.variance=learned_range", "diffusion.loss_type=hybrid"]),
                progress=False)
    # 2-D points are not 8-bit data: the discretized decoder needs a bin width
    assert main(["eval", str(run), "--metrics", "nll", "--n", "64"]) == 2
    assert "bin width" in capsys.readouterr().err
    assert main(["eval", str(run), "--metrics", "nll", "--n", "64", "--decoder", "continuous"]) == 0
    report = json.loads((run / "eval/nll.json").read_text())
    assert (run / "eval/nll_vs_t.png").stat().st_size > 1000
    assert len(report["per_t"]) == 50 and report["n"] == 64
    # the total is the sum of its parts
    assert report["bits_per_dim"] == pytest.approx(report["prior"] + report["decoder"] + report["kl_sum"], rel=1e-9)
    assert report["kl_sum"] == pytest.approx(sum(report["per_t"][1:]), rel=1e-9)


def test_ddpm_sample_uses_the_runs_variance_and_refuses_learned_without_a_head(tmp_path, capsys):
    import numpy as np

    from ddpmlab.cli import main
    from ddpmlab.training.tasks.diffusion import train

    learned = train(_toy_cfg(tmp_path, "lv", 5, ["diffusion.variance=learned_range", "diffusion.loss_type=hybrid"]),
                    progress=False)
    fixed = train(_toy_cfg(tmp_path, "fx", 5), progress=False)
    common = ["--sampler", "ddpm", "--steps", "10", "--n", "32", "--npz"]
    outs = {}
    for tag, extra in (("default", []), ("learned", ["--variance", "learned"]), ("posterior", ["--variance", "posterior"])):
        out = tmp_path / f"{tag}.png"
        assert main(["sample", str(learned), *common, *extra, "--out", str(out)]) == 0
        outs[tag] = np.load(out.with_suffix(".npz"))["samples"]
    assert np.array_equal(outs["default"], outs["learned"])  # a learned-variance run samples with its variance head
    assert not np.allclose(outs["default"], outs["posterior"])
    assert main(["sample", str(fixed), *common, "--variance", "learned", "--out", str(tmp_path / "x.png")]) == 2
    assert "no variance head" in capsys.readouterr().err
