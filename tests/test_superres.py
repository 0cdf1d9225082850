"""Super-resolution (SR3, Saharia et al. 2021): the concatenated conditioning, PSNR/SSIM, training, `ddpm upscale`."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import ddpmlab.cli.sampling as cli_sampling
from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.data import load_digits
from ddpmlab.diffusion.objectives import DiffusionObjective
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.superres import bicubic_upscale, psnr, ssim, upscale
from ddpmlab.io.images import load_picture
from ddpmlab.models import build_model
from ddpmlab.models.conditioned import (
    ConcatConditioned,
    bind_condition,
    condition_from_high_res,
    condition_from_low_res,
    low_res,
)
from ddpmlab.runs import Run, load_run
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import guided
from ddpmlab.training.run_folder import resume_config
from ddpmlab.training.tasks.diffusion import train

SR16 = ["data.dataset=folder", "data.path=unused", "data.image_size=16", "data.channels=1", "model.condition=low_res",
        "data.low_res=8", "unet.base_channels=16", "unet.norm_groups=8", "unet.channel_mults=[1,2]",
        "unet.attention_resolutions=[]", "unet.num_res_blocks=1", "unet.dropout=0", "train.mixed_precision=no",
        "diffusion.min_snr_gamma=null", "model.num_classes=null"]  # as the numbers below were measured
# 4x4 -> 8x8 digits, a tiny UNet: a run trains in seconds
TINY_RUN = ["data.dataset=digits", "data.split=train", "model.condition=low_res", "data.low_res=4",
            "unet.base_channels=8", "unet.norm_groups=4", "unet.channel_mults=[1,2]",
            "unet.attention_resolutions=[]", "unet.num_res_blocks=1", "unet.dropout=0.1", "train.batch_size=16",
            "train.warmup_steps=2",
            "train.ema_start=3", "train.save_every=6", "train.sample_n=4", "train.sample_steps=2", "train.log_every=2",
            "train.mixed_precision=no", "train.cond_noise=0.2", "train.grad_accum_steps=2"]


class _Recorder(nn.Module):
    """A denoiser that returns a fixed function of its input and remembers what it saw."""

    num_classes = None

    def forward(self, x, t, y=None):
        self.seen = x
        return x[:, :1] * 2 + x[:, 1:] * 3 + t.float()[:, None, None, None]


def test_the_wrapper_concatenates_the_condition_as_extra_channels():
    x, cond, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([1, 2, 3])
    rec = _Recorder()
    out = ConcatConditioned(rec, 1)(x, t, cond=cond)
    assert torch.equal(rec.seen, torch.cat([x, cond], 1))
    assert torch.equal(out, 2 * x + 3 * cond + t.float()[:, None, None, None])
    # bound: a plain denoiser(x, t, y) with the same output; a batch of 2B (guidance's) sees the rows repeated
    assert torch.equal(bind_condition(ConcatConditioned(rec, 1), cond)(x, t), out)
    bind_condition(ConcatConditioned(rec, 1), cond)(torch.cat([x, x]), torch.cat([t, t]))
    assert torch.equal(rec.seen, torch.cat([torch.cat([x, x]), torch.cat([cond, cond])], 1))


def test_a_built_sr_unet_sees_the_condition_and_guidance_binds_it():
    cfg = load_config("mnist_ddpm", SR16 + ["model.num_classes=3"])
    model = build_model(cfg).eval()
    assert isinstance(model, ConcatConditioned) and model.denoiser.conv_in.in_channels == 2
    nn.init.normal_(model.denoiser.conv_out.weight, std=0.1)  # zero at initialisation (Ho et al.): output 0
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([0, 2])
    cond = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = model(x, t, y, cond=cond), model(x, t, y, cond=cond.flip(0))
        assert (a - b).abs().max() > 1e-3  # the output depends on the condition
        # classifier-free guidance around the bound model: uncond + s (cond - uncond), each with the condition
        g = guided(bind_condition(model, cond), scale=2.0)(x, t, y)
        c, u = model(x, t, y, cond=cond), model(x, t, torch.full_like(y, 3), cond=cond)
    assert torch.allclose(g, u + 2.0 * (c - u), atol=1e-5)
    with pytest.raises(Exception, match="low-resolution image"):
        model(x, t, y)


def test_psnr_and_ssim_of_identical_images_and_closed_form_cases():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all() and torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    # a constant offset c on the [0, 1] scale: MSE = c^2, PSNR = -20 log10 c
    a, b = (torch.full((2, 1, 16, 16), v, dtype=torch.float64) for v in (0.3, 0.6))
    to_model = lambda u: u * 2 - 1  # noqa: E731
    # (to 1e-5 dB: torchmetrics converts the natural log with ln 10 in float32)
    assert psnr(to_model(a), to_model(b)).sub(-20 * math.log10(0.3)).abs().max() < 1e-5
    # constant images: sigma = 0, SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01)^2 (Wang et al. 2004, Eq. 13)
    expected = (2 * 0.3 * 0.6 + 1e-4) / (0.3 ** 2 + 0.6 ** 2 + 1e-4)
    assert ssim(to_model(a), to_model(b)).sub(expected).abs().max() < 1e-9


def _boxes(n, g):
    """Binary images of two random rectangles: sharp edges that bicubic upsampling blurs."""
    x = -torch.ones(n, 1, 16, 16)
    for i in range(n):
        for _ in range(2):
            r, c = torch.randint(0, 12, (2,), generator=g).tolist()
            h, w = torch.randint(2, 6, (2,), generator=g).tolist()
            x[i, 0, r:r + h, c:c + w] = 1.0
    return x


def test_a_tiny_sr_model_beats_bicubic_on_its_training_images():
    cfg = load_config("mnist_ddpm", SR16 + ["diffusion.prediction=x0"])
    g = torch.Generator().manual_seed(0)
    x0 = _boxes(8, g)
    torch.manual_seed(0)
    model = build_model(cfg)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    objective = DiffusionObjective.from_config(cfg, schedule)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    cond = condition_from_high_res(x0, cfg)
    for _ in range(150):
        t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
        loss = objective(bind_condition(model, cond), x0, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
        true = objective(bind_condition(model, cond), x0, t=t, noise=noise).item()
        shuffled = objective(bind_condition(model, cond.roll(1, 0)), x0, t=t, noise=noise).item()
    assert true < 0.1 * shuffled, (true, shuffled)
    up = upscale(Run(cfg, model, schedule, torch.device("cpu")), low_res(x0, cfg), "ddim", 10, progress=False)
    bicubic = bicubic_upscale(low_res(x0, cfg), (16, 16))
    p_model, p_bicubic = psnr(up, x0).mean().item(), psnr(bicubic, x0).mean().item()
    assert p_model > p_bicubic + 5, (p_model, p_bicubic)  # measured: 32.9 dB vs 18.0 dB
    assert ssim(up, x0).mean() > ssim(bicubic, x0).mean()


def test_sr_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.low_res"):
        load_config("mnist_ddpm", ["model.condition=low_res"])
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config("mnist_sr", ["train.eval_every=100"])
    with pytest.raises(ConfigError, match="data.upsample"):
        load_config("mnist_sr", ["data.upsample=lanczos"])
    cfg = load_config("mnist_ddpm", TINY_RUN + ["data.low_res=16", f"train.out_dir={tmp_path}", "train.name=big"])
    with pytest.raises(ConfigError, match=r"data.low_res 16x16 is larger than the images \(8x8"):
        train(cfg, progress=False)
    assert not (tmp_path / "big").exists()  # refused before the run folder


@pytest.fixture(scope="module")
def sr_runs(tmp_path_factory):
    """A 12-step run, and one stopped at 6 and resumed to 12 (cond_noise > 0, 2 micro-batches)."""
    root = tmp_path_factory.mktemp("sr")
    straight = train(load_config("mnist_ddpm", TINY_RUN + [f"train.out_dir={root}", "train.name=straight",
                                                      "train.steps=12"]), progress=False)
    stopped = train(load_config("mnist_ddpm", TINY_RUN + [f"train.out_dir={root}", "train.name=stopped",
                                                     "train.steps=6"]), progress=False)
    cfg = resume_config(stopped, load_config(None, ["train.steps=12"]), ["train.steps"])
    train(cfg, run_dir=stopped, resume=True, progress=False)
    return straight, stopped


def test_resume_of_an_sr_run_is_bit_identical(sr_runs):
    a, b = (r / "checkpoints/step_0000012" for r in sr_runs)
    for name in ("model", "ema", "optimizer"):
        wa, wb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    first, last = (load_file(sr_runs[1] / f"checkpoints/step_00000{s}/model.safetensors") for s in ("06", "12"))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it did train


def test_ddpm_upscale_writes_the_high_res_size_and_refuses_a_wrong_size(sr_runs, tmp_path, capsys):
    run = str(sr_runs[0])
    Image.new("L", (4, 4), 128).save(tmp_path / "low.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "high.png")
    assert main(["upscale", run, "--image", str(tmp_path / "low.png"), "--out", str(tmp_path / "up.png"),
                 "--steps", "2", "--no-progress"]) == 0
    assert Image.open(tmp_path / "up.png").size == (8, 8)
    capsys.readouterr()
    assert main(["upscale", run, "--image", str(tmp_path / "high.png"), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is 8x8 pixels" in err and "upscales 4x4 pictures" in err, err
    assert main(["sample", run, "--n", "2", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ddpm upscale" in err, err


def test_ddpm_upscale_samples_as_the_run_says(sr_runs, tmp_path, monkeypatch, one_thread):
    """No sampler options: the run's own sampler, steps and guidance (train.sample_*), the classes in turn."""
    caught, real = [], cli_sampling.draw_samples
    monkeypatch.setattr(cli_sampling, "draw_samples", lambda *a, **k: caught.append(real(*a, **k)) or caught[-1])
    Image.fromarray((np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)).save(tmp_path / "low.png")
    assert main(["upscale", str(sr_runs[0]), "--image", str(tmp_path / "low.png"), "--n", "3", "--seed", "2",
                 "--out", f"{tmp_path / 'up'}/", "--device", "cpu", "--no-progress"]) == 0
    run, t = load_run(sr_runs[0], device="cpu"), load_config("mnist_ddpm", TINY_RUN).train
    cond = condition_from_low_res(load_picture(tmp_path / "low.png", (1, 4, 4))[None], run.cfg, (8, 8))
    net = guided(bind_condition(run.model, cond.expand(3, -1, -1, -1)), scale=float(t.sample_guidance))
    want = generate(net, run.schedule, run.shape, 3, sampler=t.sample_sampler, steps=t.sample_steps, seed=2,
                    labels=torch.arange(3) % 10, prediction=run.cfg.diffusion.prediction, progress=False)
    assert (t.sample_sampler, t.sample_steps, t.sample_guidance) == ("dpmpp_2m_sde", 2, 2.0)
    torch.testing.assert_close(caught[0], want, rtol=0, atol=1e-6)


def test_ddpm_eval_of_an_sr_run_reports_the_bicubic_baseline_exactly(sr_runs, tmp_path, capsys):
    out = tmp_path / "sr.json"
    assert main(["eval", str(sr_runs[0]), "--n", "20", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "psnr (dB)" in table and "bicubic" in table
    res = json.loads(out.read_text())
    # the baseline by hand: 4x4 block means of the first 20 test digits, bicubic back to 8x8, PSNR on [0, 1]
    truth = load_digits("test")[0][:20].double()
    bic = F.interpolate(F.avg_pool2d(truth, 2), size=(8, 8), mode="bicubic", align_corners=False).clamp(-1, 1)
    mse = ((bic - truth) / 2).pow(2).mean((1, 2, 3))
    assert abs(res["metrics"]["bicubic"]["psnr"] - (10 * torch.log10(1 / mse)).mean().item()) < 1e-4
    assert "fid" not in res["metrics"]["model"] and res["notes"]  # the digit classifier is for 28x28: no FID
    assert out.with_suffix(".png").is_file()
