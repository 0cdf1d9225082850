"""Classifier-free guidance, RePaint inpainting and SDEdit, checked against exact answers.

Ground truth: a Gaussian mixture whose components are the classes (exact conditional and
unconditional noise predictors), a Gaussian with a full covariance (exact conditionals of a
hole given the rest), and a class-conditional 8x8-digits model judged by a classifier.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.diffusion.analytic import ClassConditionalDenoiser, ExactDenoiser, Gaussian, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.editing import repaint, repaint_nfe, repaint_times, sdedit
from ddpmlab.samplers.guidance import conditioning, drop_labels, guided
from ddpmlab.samplers.registry import SAMPLERS

S = NoiseSchedule.make("linear", 1000)
# four overlapping classes: even exact class-k samples are often nearer another mean
RING = GaussianMixture.ring(k=4, radius=1.0, std=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _bayes_class(x: torch.Tensor, mix: GaussianMixture) -> torch.Tensor:
    """The most probable component of each point under the (equal-weight, equal-std) mixture."""
    return torch.cdist(x.double(), mix.means).argmin(1)


def _sample(model, y, n, sampler="ddim", steps=50, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return SAMPLERS[sampler](ModelPredictor(model, S, y=y), S, x_T, steps, generator=g, **options)


# ---------------------------------------------------------------- guidance


def test_label_dropout_replaces_labels_at_the_configured_rate():
    y = torch.arange(200_000) % 10
    out = drop_labels(y, 0.1, null_label=10, generator=torch.Generator().manual_seed(0))
    frac = (out == 10).double().mean().item()
    assert abs(frac - 0.1) < 4 * (0.1 * 0.9 / len(y)) ** 0.5  # 4 standard errors
    assert torch.equal(out[out != 10], y[out != 10])  # the others are untouched
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_guided_output_is_uncond_plus_scale_times_difference_from_one_batched_call():
    base = ClassConditionalDenoiser(RING, S)
    calls = []

    class Spy(torch.nn.Module):
        num_classes = base.num_classes

        def forward(self, x, t, y=None):
            calls.append(x.shape[0])
            return base(x, t, y)

    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.full((16,), 300)
    y = torch.arange(16) % 4
    out = guided(Spy(), y, scale=2.5)(x, t)
    cond, uncond = base(x, t, y), base(x, t, None)
    assert calls == [32]  # both passes in one forward of batch 2B
    # Ho & Salimans 2022, Eq. 6
    assert torch.allclose(out, uncond + 2.5 * (cond - uncond), atol=1e-12)


def test_guidance_scale_one_is_conditional_and_zero_unconditional_sampling_exactly():
    model = ClassConditionalDenoiser(RING, S)
    y = torch.arange(64) % 4
    cond = _sample(model, y, 64, steps=20)
    assert torch.equal(_sample(guided(model, scale=1.0), y, 64, steps=20), cond)
    uncond = _sample(model, None, 64, steps=20)
    assert torch.equal(_sample(guided(model, scale=0.0), y, 64, steps=20), uncond)
    assert not torch.allclose(cond, uncond)


def test_guided_samples_land_on_the_requested_component():
    model = ClassConditionalDenoiser(RING, S)
    n = 2000
    y = torch.arange(n) % 4
    hit = {}
    for scale in (0.0, 1.0, 3.0):
        x = _sample(guided(model, scale=scale), y, n, sampler="ddpm", steps=100)
        hit[scale] = (_bayes_class(x, RING) == y).double().mean().item()
    # exact class samples classified by the Bayes rule: the target for scale 1
    exact = RING.means[y] + RING.stds[0] * torch.randn(n, 2, generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.float64)
    bayes = (_bayes_class(exact, RING) == y).double().mean().item()
    assert abs(hit[1.0] - bayes) < 0.04, (hit, bayes)  # conditional sampling = the component itself
    assert hit[3.0] > 0.97 and hit[3.0] > hit[1.0] + 0.05, hit  # guidance pushes further in
    assert abs(hit[0.0] - 0.25) < 0.05, hit  # unconditional: spread over all four


# ---------------------------------------------------------------- inpainting (RePaint)

D = 6
_i = torch.arange(D, dtype=torch.float64)
GAUSS = Gaussian(torch.linspace(-0.5, 0.5, D), 0.25 * 0.8 ** (_i[:, None] - _i[None]).abs())  # AR(1), rho 0.8
HOLE = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.float64)  # 1 = fill
X0 = torch.tensor([0.4, 0.5, 0.0, 0.0, -0.6, 0.1], dtype=torch.float64)  # the hole's values are ignored


def test_repaint_visits_each_stretch_jump_n_sample_times():
    n, jl, jn = 50, 5, 3
    ts = repaint_times(n, jl, jn)
    assert ts[0] == n - 1 and ts[-1] == -1
    assert all(abs(b - a) == 1 for a, b in zip(ts, ts[1:]))
    down = [(a, b) for a, b in zip(ts, ts[1:]) if b < a]
    # jump points 0, 5, ..., 40: the steps from entries 1..45 are walked jn times, the others once
    assert len(down) == repaint_nfe(n, jl, jn) == 5 + 45 * jn
    assert all(down.count((i, i - 1)) == (jn if 1 <= i <= 45 else 1) for i in range(n))
    assert repaint_times(n, 1, 1) == list(range(n - 1, -2, -1))  # no jumps: plain DDPM order


def test_repaint_nfe_counts_the_schedule_without_building_it():
    """n + ceil((n - J) / J) (R - 1) J denoising steps: the steps down in repaint_times, for every small case;
    a request of 10**7 resamplings is counted at once (its schedule would hold ~10**10 entries)."""
    for n in range(1, 30):
        for jl in range(1, 9):
            for jn in range(1, 4):
                ts = repaint_times(n, jl, jn)
                assert repaint_nfe(n, jl, jn) == sum(b < a for a, b in zip(ts, ts[1:])), (n, jl, jn)
    assert repaint_nfe(250, 10, 10**7) == 250 + 24 * (10**7 - 1) * 10
    with pytest.raises(ConfigError, match="jump_n_sample >= 1"):
        repaint_nfe(50, 10, 0)


def _repaint(n, steps, jump_length, jump_n_sample, seed=0):
    predict = ModelPredictor(ExactDenoiser(GAUSS, S), S)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, D, generator=g, dtype=torch.float64)
    return repaint(predict, S, x_T, steps, x0_known=X0.expand(n, D), mask=HOLE, generator=g,
                   jump_length=jump_length, jump_n_sample=jump_n_sample)


def test_repaint_keeps_the_known_part_and_fills_the_hole_with_the_gaussian_conditional():
    known = HOLE == 0
    mean, cov = GAUSS.conditional(known, X0[known])
    err = {}
    for jn in (1, 10):
        x = _repaint(2000, 100, 1, jn)
        assert torch.equal(x[:, known], X0[known].expand(2000, -1))  # kept exactly
        h = x[:, ~known]
        err[jn] = ((h.mean(0) - mean).abs().max().item(), (torch.cov(h.T) - cov).abs().max().item())
    prior_gap = (GAUSS.mean()[~known] - mean).abs().max().item()  # 0.33: what ignoring the context costs
    # with resampling the hole's mean and covariance match the exact conditional (std 0.27, se 0.006) ...
    assert err[10][0] < 0.05 < prior_gap and err[10][1] < 0.01, err
    # ... and resampling is what harmonises: without it the hole is far less coherent with the rest
    assert err[1][0] > 2 * err[10][0] and err[1][1] > 2 * err[10][1], err


class _HeadGivingFixedVariance:
    """The exact denoiser with a 'variance head' whose log sigma^2 is beta_t or beta_tilde_t of
    the sampler's (respaced) schedule: a learned-variance model whose answer is known."""

    def __init__(self, predict, fixed: str):
        self.predict, self.fixed = predict, fixed

    def __call__(self, x, t):
        return self.predict(x, t)

    def with_log_variance(self, x, t, schedule, index):
        eps, x0 = self.predict(x, t)
        table = schedule.betas if self.fixed == "fixed_large" else schedule.posterior_variance
        return eps, x0, table[index].log().reshape(-1, 1).expand_as(x)


@pytest.mark.parametrize("fixed", ["fixed_large", "fixed_small"])
def test_repaint_with_a_learned_variance_steps_with_the_variance_head(fixed):
    """RePaint with variance learned_range uses the model's variance, not a fixed one: a head that
    returns beta_t reproduces fixed_large bit for bit, one that returns beta_tilde_t fixed_small."""
    exact = ModelPredictor(ExactDenoiser(GAUSS, S), S)

    def run(predict, variance):
        g = torch.Generator().manual_seed(3)
        x_T = torch.randn(64, D, generator=g, dtype=torch.float64)
        return repaint(predict, S, x_T, 50, x0_known=X0.expand(64, D), mask=HOLE, generator=g,
                       jump_length=5, jump_n_sample=2, variance=variance)

    learned = run(_HeadGivingFixedVariance(exact, fixed), "learned_range")
    other = "fixed_small" if fixed == "fixed_large" else "fixed_large"
    assert torch.allclose(learned, run(exact, fixed), atol=1e-12)
    assert not torch.allclose(learned, run(exact, other), atol=1e-3)


# ---------------------------------------------------------------- image-to-image (SDEdit)

G3 = Gaussian([0.5, -0.5, 0.0], [[0.3, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.2]])


def _sdedit(x_in, strength, sampler="ddpm", steps=None, seed=0, **options):
    predict = ModelPredictor(ExactDenoiser(G3, S), S)
    return sdedit(SAMPLERS[sampler], predict, S, x_in, strength, steps,
                  generator=torch.Generator().manual_seed(seed), **options)


def test_img2img_strength_zero_returns_the_input_and_one_ignores_it():
    a = torch.randn(32, 3, dtype=torch.float64)
    assert torch.equal(_sdedit(a, 0.0), a)
    b = a + 3.0
    for sampler, steps in (("ddim", 20), ("ddpm", 50)):
        out_a, out_b = _sdedit(a, 1.0, sampler, steps), _sdedit(b, 1.0, sampler, steps)
        assert torch.equal(out_a, out_b)  # the input has no say at all
        g = torch.Generator().manual_seed(0)
        plain = SAMPLERS[sampler](ModelPredictor(ExactDenoiser(G3, S), S), S,
                                  torch.randn(a.shape, generator=g, dtype=a.dtype), steps, generator=g)
        assert torch.equal(out_a, plain)  # strength 1 is the plain sampler


def test_img2img_with_exact_gaussian_denoiser_samples_the_posterior_of_the_noised_input():
    # x_t0 ~ q(x_t0 | x); the exact ancestral sampler then draws x_0 ~ p(x_0 | x_t0), so over both
    # E[x_0] = mu + a Sigma Sigma_t^-1 (x - mu) and Cov = Sigma - a Sigma Sigma_t^-1 Sigma
    # + a (1 - a) Sigma Sigma_t^-2 Sigma, with a = abar_t0, Sigma_t = a Sigma + (1 - a) I
    n, strength = 6000, 0.3
    x = torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64)
    out = _sdedit(x.expand(n, 3), strength)
    a = float(S.alphas_cumprod[round(strength * 1000) - 1])
    sig, eye = G3.covariance(), torch.eye(3, dtype=torch.float64)
    k = torch.linalg.inv(a * sig + (1 - a) * eye)
    mean = G3.mean() + a * sig @ k @ (x - G3.mean())
    cov = sig - a * sig @ k @ sig + a * (1 - a) * sig @ k @ k @ sig
    assert torch.allclose(out.mean(0), mean, atol=0.02), (out.mean(0), mean)  # se 0.006
    assert torch.allclose(torch.cov(out.T), cov, atol=0.015), (torch.cov(out.T), cov)
    assert (mean - x).abs().max() > 0.2 and (mean - G3.mean()).abs().max() > 0.2  # between input and data


@pytest.mark.parametrize("sampler,steps", [("ddim", 300), ("dpmpp_2m", 20)])
def test_img2img_with_an_ode_sampler_follows_the_exact_probability_flow_map(sampler, steps):
    # for Gaussian data the probability-flow ODE from t0 to 0 is the linear map
    # x_0 = mu + Sigma^1/2 Sigma_t^-1/2 (x_t0 - sqrt(a) mu): each sample, not just the distribution
    if sampler not in SAMPLERS:
        pytest.skip(f"sampler {sampler} not registered")
    n, strength = 500, 0.3
    x = torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64).expand(n, 3)
    out = _sdedit(x, strength, sampler, steps)
    a = float(S.alphas_cumprod[round(strength * 1000) - 1])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)  # sdedit's first draw
    x_t0 = a**0.5 * x + (1 - a) ** 0.5 * noise
    lam, u = G3.eigvals, G3.eigvecs
    flow = u @ torch.diag((lam / (a * lam + 1 - a)).sqrt()) @ u.T
    exact = G3.mean() + (x_t0 - a**0.5 * G3.mean()) @ flow.T
    assert (out - exact).abs().max() < 0.01


# ---------------------------------------------------------------- bad input


def test_guidance_and_labels_on_bad_models_are_refused():
    uncond = ExactDenoiser(RING, S)
    with pytest.raises(DDPMError, match="needs a class-conditional model"):
        guided(uncond, scale=2.0)
    with pytest.raises(DDPMError, match="needs a class-conditional model"):
        conditioning(uncond, 4, guidance=2.0)
    model = ClassConditionalDenoiser(RING, S)
    with pytest.raises(DDPMError, match=r"class 4 is out of range: this model knows classes 0\.\.3"):
        conditioning(model, 4, label=4)
    with pytest.raises(DDPMError, match="label dropout"):
        conditioning(model, 4, label=1, guidance=2.0, label_dropout=0.0)
    with pytest.raises(DDPMError, match="must be >= 0"):
        guided(model, scale=-1.0)
    wrapped, labels = conditioning(model, 6, guidance=2.0)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1] and wrapped.scale == 2.0


def test_bad_editing_input_is_refused():
    a = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(DDPMError, match=r"strength must be in \[0, 1\]"):
        _sdedit(a, 1.5)
    with pytest.raises(ConfigError, match="jump_length >= 1"):
        repaint_times(10, 0, 2)


def test_config_refuses_bad_label_dropout_and_labels_on_toy_data():
    from ddpmlab.config import load_config

    with pytest.raises(ConfigError, match="'train.label_dropout' must be in \\[0, 1\\), got 1.0"):
        load_config("mnist", ["model.num_classes=10", "train.label_dropout=1.0"])
    with pytest.raises(ConfigError, match="2D toy data has no labels"):
        load_config("toy2d", ["model.num_classes=3"])


def test_conditional_training_on_unlabelled_images_is_refused(tmp_path):
    from ddpmlab.config import load_config
    from ddpmlab.training.tasks.diffusion import train

    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = load_config("mnist", ["data.dataset=folder", f"data.path={tmp_path}", "data.image_size=[8,8]",
                                "data.channels=1", "model.num_classes=2", f"train.out_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="has no labels; put the images in one sub-folder per class"):
        train(cfg, progress=False)


# ---------------------------------------------------------------- the command line


def _hand_made_run(root, num_classes=None, seed=0):
    """A run directory with a small random (not trained) 8x8 digits UNet: enough to drive the CLI."""
    from ddpmlab.config import load_config, save_config
    from ddpmlab.io.checkpoint import CONFIG_FILE, save_checkpoint
    from ddpmlab.models import build_model

    cfg = load_config("mnist_ddpm", ["data.dataset=digits", "unet.base_channels=8", "unet.norm_groups=4",
                                "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]",
                                f"model.num_classes={num_classes if num_classes else 'null'}"])
    torch.manual_seed(seed)
    model = build_model(cfg)
    for p in model.parameters():  # the UNet starts with a zero output layer: make it say something
        p.data.normal_(0, 0.05)
    root.mkdir(parents=True)
    save_config(cfg, root / CONFIG_FILE)
    save_checkpoint(root, 1, model.state_dict(), model.state_dict(), {"state": {}, "param_groups": []})
    return root


def _tiles(png, k, side=8, scale=4, pad=2):
    """The k tiles of a one-row grid written by save_grid, as uint8 (side, side) arrays."""
    g = np.array(Image.open(png))[::scale, ::scale]
    return [g[pad:pad + side, pad + j * (side + pad):pad + j * (side + pad) + side] for j in range(k)]


def test_cli_inpaint_keeps_the_unmasked_pixels_and_shows_input_mask_results(tmp_path, capsys):
    from ddpmlab.cli import main

    run = _hand_made_run(tmp_path / "run")
    img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 3:7] = 255
    Image.fromarray(img).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["inpaint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--n", "3", "--steps", "20", "--jump-length", "5", "--jump-n-sample", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    tiles = _tiles(out, 5)
    assert np.array_equal(tiles[0], img) and np.array_equal(tiles[1], mask)
    keep = mask == 0
    for res in tiles[2:]:
        assert np.array_equal(res[keep], img[keep])  # the kept pixels, to the last bit
    assert not np.array_equal(tiles[2][~keep], img[~keep])  # the hole was redrawn
    assert not np.array_equal(tiles[2], tiles[3])  # and differently per result

    # strength 0: img2img returns the input unchanged
    assert main(["img2img", str(run), "--image", str(tmp_path / "in.png"), "--strength", "0", "--n", "2",
                 "--out", str(tmp_path / "same.png"), "--device", "cpu"]) == 0
    assert all(np.array_equal(t, img) for t in _tiles(tmp_path / "same.png", 3))
    capsys.readouterr()

    # a picture of the wrong size: one line naming both sizes
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "big.png")
    rc = main(["inpaint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "big.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "10x12" in err and "8x8" in err and "--resize" in err
    rc = main(["img2img", str(run), "--image", str(tmp_path / "big.png"), "--resize", "--strength", "0.2",
               "--steps", "3", "--n", "1", "--out", str(tmp_path / "r.png"), "--device", "cpu"])
    assert rc == 0 and Image.open(tmp_path / "r.png").size == ((2 + 2 * 10) * 4, (2 + 10) * 4)
    capsys.readouterr()
    # a guidance scale on this unconditional model
    rc = main(["sample", str(run), "--guidance", "2.0", "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--guidance needs a class-conditional model" in err


def test_cli_sample_with_class_and_guidance(tmp_path, capsys):
    from ddpmlab.cli import main

    run = _hand_made_run(tmp_path / "cond", num_classes=10)
    rc = main(["sample", str(run), "--class", "10", "--guidance", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "class 10 is out of range" in err and "0..9" in err
    assert main(["sample", str(run), "--class", "3", "--guidance", "2", "--n", "4", "--steps", "3",
                 "--sampler", "ddim", "--device", "cpu", "--npz"]) == 0
    out = run / "samples" / "ddim_3steps_seed0_class3_guidance2.npz"
    x = torch.from_numpy(np.load(out)["samples"])
    # the same samples from the library: --class 3 --guidance 2 is guided(model, 3, 2.0)
    from ddpmlab.io.checkpoint import load_model
    from ddpmlab.samplers.generate import generate

    cfg, model = load_model(run)
    sched, pred = NoiseSchedule.from_config(cfg.diffusion), cfg.diffusion.prediction
    ref = generate(guided(model, scale=2.0), sched, (1, 8, 8), 4, steps=3, labels=torch.full((4,), 3),
                   prediction=pred, progress=False)
    plain = generate(model, sched, (1, 8, 8), 4, steps=3, labels=torch.full((4,), 3), prediction=pred,
                     progress=False)
    assert torch.allclose(x, ref, atol=1e-6) and not torch.allclose(x, plain, atol=1e-3)


def test_a_conditional_runs_sample_guidance_is_the_default_scale_and_flags_override_it(tmp_path, capsys):
    from ddpmlab.cli import main
    from ddpmlab.io.checkpoint import load_model
    from ddpmlab.runs import SamplingRequest, load_run, plan_request
    from ddpmlab.samplers.generate import generate

    run = _hand_made_run(tmp_path / "cond", num_classes=10)  # the mnist config: train.sample_guidance 2
    assert main(["sample", str(run), "--n", "4", "--steps", "3", "--sampler", "ddim", "--device", "cpu",
                 "--npz"]) == 0
    assert "guidance 2: the run's train.sample_guidance" in capsys.readouterr().out
    x = torch.from_numpy(np.load(run / "samples" / "ddim_3steps_seed0_guidance2.npz")["samples"])
    assert main(["sample", str(run), "--n", "4", "--steps", "3", "--sampler", "ddim", "--device", "cpu", "--npz",
                 "--guidance", "0"]) == 0
    x0 = torch.from_numpy(np.load(run / "samples" / "ddim_3steps_seed0_guidance0.npz")["samples"])
    cfg, model = load_model(run)
    sched, labels = NoiseSchedule.from_config(cfg.diffusion), torch.arange(4)  # guided, no class: 0, 1, 2, 3
    pred = cfg.diffusion.prediction
    ref = generate(guided(model, scale=2.0), sched, (1, 8, 8), 4, steps=3, labels=labels, prediction=pred,
                   progress=False)
    uncond = generate(guided(model, scale=0.0), sched, (1, 8, 8), 4, steps=3, labels=labels, prediction=pred,
                      progress=False)
    assert torch.allclose(x, ref, atol=1e-6) and torch.allclose(x0, uncond, atol=1e-6)
    assert not torch.allclose(x, x0, atol=1e-3)
    # img2img of a given picture keeps it unguided unless a class is asked for; a class takes the default
    r = load_run(run, "ema", "cpu")
    def img2img(**label):
        return plan_request(r, SamplingRequest("ddim", 3, n=2, img2img_t0=500, cycle_classes=False, **label),
                            log=lambda m: None)

    assert img2img().guidance is None
    assert img2img(label=3).guidance == 2.0


def test_config_refuses_a_bad_sample_guidance():
    from ddpmlab.config import load_config

    with pytest.raises(ConfigError, match="'train.sample_guidance' must be a guidance scale >= 0 or null, got -1"):
        load_config("mnist", ["train.sample_guidance=-1"])
    with pytest.raises(ConfigError, match="needs the unconditional model that label dropout trains"):
        load_config("mnist", ["train.label_dropout=0"])
    assert load_config("mnist", ["train.label_dropout=0", "train.sample_guidance=null"]).train.sample_guidance is None


# ---------------------------------------------------------------- a trained model: digits


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A class-conditional 8x8-digits UNet trained for 250 steps with label dropout 0.2 (~15 s)."""
    import ddpmlab.training.tasks.diffusion as train_mod
    from ddpmlab.config import load_config

    seen = []  # the labels the network sees in training
    real_build = train_mod.build_model

    def record(module, args, kwargs):
        if module.training:
            seen.append((args[2] if len(args) > 2 else kwargs["y"]).clone())

    def spy(cfg, *args, **kwargs):
        model = real_build(cfg, *args, **kwargs)
        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("digits")
    cfg = load_config("mnist", [
        "data.dataset=digits", "data.split=train", "unet.base_channels=16", "unet.channel_mults=[1,2]",
        "unet.attention_resolutions=[]", "unet.norm_groups=8", "model.num_classes=10",
        "train.label_dropout=0.2", "train.steps=250", "train.batch_size=64", "train.lr=2e-3",
        "train.warmup_steps=20", "train.ema_start=50", "train.ema_decay=0.98", "train.save_every=100000",
        "train.sample_n=10", "train.sample_steps=2", "train.sample_sampler=ddim", "train.log_every=50",
        f"train.out_dir={root}", "train.name=cond"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_model", spy)
        run = train_mod.train(cfg, progress=False)
    torch.set_num_threads(n)
    return run, torch.cat(seen)


def test_training_drops_labels_at_the_configured_rate(digits_run):
    _, y = digits_run
    frac = (y == 10).double().mean().item()  # 250 x 64 labels, p = 0.2: se 0.003
    assert abs(frac - 0.2) < 0.015, frac
    assert set(y[y != 10].tolist()) == set(range(10))


def test_guidance_moves_digit_samples_towards_the_requested_class(digits_run):
    from sklearn.linear_model import LogisticRegression

    from ddpmlab.data import load_digits
    from ddpmlab.io.checkpoint import load_model
    from ddpmlab.samplers.generate import generate

    x, y = load_digits("train")
    clf = LogisticRegression(max_iter=1000).fit(x.flatten(1).numpy(), y.numpy())
    xt, yt = load_digits("test")
    assert clf.score(xt.flatten(1).numpy(), yt.numpy()) > 0.9  # the judge itself is good
    cfg, model = load_model(digits_run[0])
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    labels = torch.arange(100) % 10
    acc = {}
    for scale in (0.0, 1.0, 3.0):
        out = generate(guided(model, scale=scale), schedule, (1, 8, 8), 100, steps=20, labels=labels,
                       progress=False)
        acc[scale] = float((torch.from_numpy(clf.predict(out.flatten(1).numpy())) == labels).float().mean())
    print("classifier accuracy on the requested digit, by guidance scale:", acc)
    # unconditional samples hit the requested digit by chance (~10 %); guidance well above that
    assert acc[0.0] < 0.3 and acc[3.0] > acc[0.0] + 0.5 and acc[3.0] >= acc[1.0], acc
