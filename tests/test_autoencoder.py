"""The autoencoder stage and latent diffusion (Rombach et al. 2022) on 8x8 digits with tiny networks."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.data import build_dataset, data_shape
from ddpmlab.data.latents import AE_STATS_FILE, LATENTS_FILE
from ddpmlab.errors import ConfigError
from ddpmlab.models import build_model
from ddpmlab.models.autoencoder import LatentCodec, build_autoencoder
from ddpmlab.runs import SamplingRequest, edit_img2img, edit_inpaint, load_autoencoder, load_run, plan_request
from ddpmlab.training.data import latent_dataset
from ddpmlab.training.loop import make_accelerator
from ddpmlab.training.tasks.autoencoder import reconstruction_loss, train_autoencoder
from ddpmlab.training.tasks.diffusion import train

AE = ["data.dataset=digits", "autoencoder.block_out_channels=[8,16]", "autoencoder.norm_groups=4",
      "autoencoder.latent_channels=2", "autoencoder.stats_n=512", "train.batch_size=16", "train.lr=2e-3",
      "train.warmup_steps=2", "train.ema_decay=0.5", "train.mixed_precision=no", "train.tensorboard=false",
      "train.log_every=5", "train.save_every=5", "train.keep_checkpoints=5", "train.device=cpu"]
GAN = ["autoencoder.discriminator=true", "autoencoder.disc_start=3", "autoencoder.disc_layers=1",
       "autoencoder.disc_channels=8"]
LDM = ["data.dataset=digits", "unet.base_channels=8", "unet.channel_mults=[1]", "unet.num_res_blocks=1",
       "unet.attention_resolutions=[]", "unet.norm_groups=4", "unet.dropout=0.0", "train.batch_size=8",
       "train.warmup_steps=1", "train.mixed_precision=no", "train.tensorboard=false", "train.sample_n=4",
       "train.sample_steps=2", "train.save_every=2", "train.log_every=2", "train.device=cpu"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path / "cache"))


def _train_ae(tmp_path, name, steps, extra=(), resume=False):
    cfg = load_config(None, AE + [f"train.out_dir={tmp_path}", f"train.name={name}", f"train.steps={steps}",
                                  *extra])
    run = tmp_path / name
    if resume:
        from ddpmlab.training.run_folder import resume_config
        cfg = resume_config(run, cfg, ["train.steps"])
    return train_autoencoder(cfg, run_dir=run if resume else None, resume=resume, progress=False)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPMLAB_CACHE", str(tmp / "cache"))
        torch.set_num_threads(1)
        return _train_ae(tmp, "ae", 20)


def _digits(n):
    return build_dataset(load_config(None, ["data.dataset=digits"])).x[:n]


def test_round_trip_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    ae = build_autoencoder(1, [8, 16], 2, 1, 4)
    x = _digits(8)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        x_rec, kl = ae(x, generator=g)
        loss = reconstruction_loss(x_rec, x, "l1") + 1e-6 * kl.mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        mse = ((ae.decode(ae.posterior(x).mean).clamp(-1, 1) - x) / 2).pow(2).mean().item()
    assert losses[0] > 0.6  # untrained: the reconstruction is about 0 everywhere (digits are mostly -1)
    assert np.mean(losses[-10:]) < 0.15 * losses[0]  # measured: 0.048 of the first
    assert 10 * np.log10(1 / mse) > 25.0  # PSNR in dB on the [0, 1] scale; measured 33.3


def test_autoencoder_run_writes_psnr_and_scale_factor(ae_run):
    stats = json.loads((ae_run / AE_STATS_FILE).read_text())
    assert stats["scale_factor"] == pytest.approx(1 / stats["latent_std"])
    assert stats["shift_factor"] == pytest.approx(stats["latent_mean"])
    assert stats["latent_shape"] == [2, 4, 4] and stats["held_out_images"] == 90  # 5 % of 1,797 digits
    assert np.isfinite(stats["psnr_db"]) and stats["psnr_db"] > 5
    assert "stage: autoencoder" in (ae_run / "config.yaml").read_text()
    # the codec's latents of training images have mean 0 and std 1 by construction
    codec = load_autoencoder(ae_run, "cpu")
    z = codec.encode(_digits(512))
    assert abs(z.mean().item()) < 0.05 and z.std().item() == pytest.approx(1.0, abs=0.05)


def test_autoencoder_resume_is_bit_exact(tmp_path):
    straight = _train_ae(tmp_path, "straight", 10, GAN)
    _train_ae(tmp_path, "halves", 5, GAN)
    halves = _train_ae(tmp_path, "halves", 10, GAN, resume=True)
    for f in ("model", "ema", "optimizer", "discriminator"):
        a = load_file(str(straight / "checkpoints/step_0000010" / f"{f}.safetensors"))
        b = load_file(str(halves / "checkpoints/step_0000010" / f"{f}.safetensors"))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), f
    log_a, log_b = (p.joinpath("log.csv").read_text().splitlines() for p in (straight, halves))
    assert [r.split(",")[:6] for r in log_a] == [r.split(",")[:6] for r in log_b]
    assert float(log_a[-1].split(",")[5]) > 0  # the discriminator trained (d_loss column)


def test_latent_cache_is_reused_and_invalidated_by_new_weights(tmp_path, monkeypatch):
    ae = _train_ae(tmp_path, "ae", 5)
    cfg = load_config(None, LDM + [f"model.autoencoder={ae}"])
    acc, _ = make_accelerator(cfg)
    calls = []
    original = LatentCodec.encode
    monkeypatch.setattr(LatentCodec, "encode", lambda self, x: calls.append(len(x)) or original(self, x))
    data = build_dataset(cfg)
    first, rec1 = latent_dataset(cfg, data, acc, True, False)
    assert sum(calls) == len(data) == len(first)
    codec = load_autoencoder(ae, "cpu")
    assert torch.allclose(first.x[:16], original(codec, data.x[:16]), atol=1e-5)
    assert torch.equal(first.y, data.y)
    second, rec2 = latent_dataset(cfg, data, acc, True, False)
    assert sum(calls) == len(data)  # read from the cache: nothing encoded
    assert torch.equal(first.x, second.x) and rec1["cache_file"] == rec2["cache_file"]
    _train_ae(tmp_path, "ae", 10, resume=True)  # new weights: the key changes
    third, rec3 = latent_dataset(cfg, data, acc, True, False)
    assert sum(calls) == 2 * len(data) and rec3["cache_file"] != rec1["cache_file"]
    assert not torch.equal(first.x, third.x)


def _ldm(tmp_path, ae, name, steps, resume=False):
    cfg = load_config(None, LDM + [f"model.autoencoder={ae}", f"train.out_dir={tmp_path}", f"train.name={name}",
                                   f"train.steps={steps}"])
    run = tmp_path / name
    if resume:
        from ddpmlab.training.run_folder import resume_config
        cfg = resume_config(run, cfg, ["train.steps"])
    return train(cfg, run_dir=run if resume else None, resume=resume, progress=False)


def test_latent_diffusion_trains_resumes_and_samples_pixels(tmp_path, ae_run, capsys):
    cfg = load_config(None, LDM + [f"model.autoencoder={ae_run}"])
    assert data_shape(cfg) == (2, 4, 4)
    net = build_model(cfg)
    assert net.conv_in.in_channels == 2 and net(torch.zeros(1, 2, 4, 4), torch.zeros(1).long()).shape == (1, 2, 4, 4)
    straight = _ldm(tmp_path, ae_run, "straight", 4)
    _ldm(tmp_path, ae_run, "halves", 2)
    halves = _ldm(tmp_path, ae_run, "halves", 4, resume=True)
    for f in ("model", "ema", "optimizer"):
        a = load_file(str(straight / "checkpoints/step_0000004" / f"{f}.safetensors"))
        b = load_file(str(halves / "checkpoints/step_0000004" / f"{f}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    record = json.loads((straight / LATENTS_FILE).read_text())
    assert record["latent_shape"] == [2, 4, 4] and record["scale_factor"] > 0
    out = tmp_path / "grid.png"
    assert main(["sample", str(straight), "--n", "3", "--steps", "2", "--npz", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    x = np.load(out.with_suffix(".npz"))["samples"]
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1  # decoded to pixels
    assert (straight / "samples" / "final.png").is_file()
    torn = tmp_path / "torn"  # a run whose latents.json a kill cut short: one line, no traceback
    shutil.copytree(straight, torn)
    (torn / LATENTS_FILE).write_text('{"autoencoder": "')
    capsys.readouterr()
    assert main(["sample", str(torn), "--n", "1", "--steps", "2", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latents.json is damaged" in err[0] and "model.autoencoder" in err[0]

    # editing a picture: RePaint / SDEdit on its latents, decoded; inpainting keeps the unmasked pixels
    from PIL import Image

    img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    mask = np.zeros((8, 8), np.uint8)
    mask[0:4, 0:4] = 255  # the top-left 2x2 of the 4x4 latents (f = 2) are redrawn
    Image.fromarray(img).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    run = load_run(straight, "ema", "cpu")
    image = torch.from_numpy(img).float()[None] / 127.5 - 1
    hole = torch.from_numpy(mask > 0)[None].float()
    x = edit_inpaint(run, run.model, image, hole, 2, steps=4, jump_length=2, jump_n_sample=2, progress=False)
    assert x.shape == (2, 1, 8, 8) and torch.equal(x[:, :, 4:], image[None, :, 4:].expand(2, -1, -1, -1))
    assert torch.equal(x[:, :, :, 4:], image[None, :, :, 4:].expand(2, -1, -1, -1))
    assert not torch.allclose(x[0, :, :4, :4], image[:, :4, :4], atol=1e-2)  # the hole was redrawn, decoded
    z = run.codec.encode(image[None])
    plan = plan_request(run, SamplingRequest("ddim", 3, n=2, cycle_classes=False, img2img_t0=500), log=lambda m: None)
    same = edit_img2img(run, plan, image, 0.0, 2, progress=False)  # strength 0: the decoded latents of the input
    assert torch.allclose(same, run.codec.decode(z).expand(2, -1, -1, -1), atol=1e-6)
    assert main(["inpaint", str(straight), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--n", "2", "--steps", "4", "--jump-length", "2", "--jump-n-sample", "1", "--device", "cpu",
                 "--out", str(tmp_path / "fill.png"), "--no-progress"]) == 0
    assert main(["img2img", str(straight), "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "3",
                 "--n", "2", "--device", "cpu", "--out", str(tmp_path / "var.png"), "--no-progress"]) == 0
    assert Image.open(tmp_path / "fill.png").size == ((2 + 4 * 10) * 4, (2 + 10) * 4)  # input, mask, 2 fills
    assert Image.open(tmp_path / "var.png").size == ((2 + 3 * 10) * 4, (2 + 10) * 4)  # input, 2 variations


def test_the_latent_shape_reaches_unet_and_dit(ae_run):
    for kind in (["model.kind=unet"], ["model.kind=dit", "dit.depth=1", "dit.hidden=16",
                                       "dit.heads=2", "dit.patch_size=2"]):
        cfg = load_config(None, LDM + [f"model.autoencoder={ae_run}", *kind])
        net = build_model(cfg)
        assert net(torch.zeros(3, 2, 4, 4), torch.zeros(3).long()).shape == (3, 2, 4, 4), kind


def test_diffusers_autoencoder_folder_as_model_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
                        norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1).eval()
    vae.save_pretrained(tmp_path / "vae")
    cfg = load_config(None, LDM + [f"model.autoencoder={tmp_path / 'vae'}"])
    assert data_shape(cfg) == (2, 4, 4)
    codec = load_autoencoder(tmp_path / "vae", "cpu")
    x = _digits(8)
    with torch.no_grad():  # diffusers itself is the reference
        z_ref = (vae.encode(x).latent_dist.mean - 0.1) * 0.5
        x_ref = vae.decode(z_ref / 0.5 + 0.1).sample.clamp(-1, 1)
    z = codec.encode(x)
    assert torch.allclose(z, z_ref, atol=1e-6)
    assert torch.allclose(codec.decode(z), x_ref, atol=1e-6)
    run = _ldm(tmp_path, tmp_path / "vae", "ldm", 2)
    assert json.loads((run / LATENTS_FILE).read_text())["scale_factor"] == 0.5


def test_a_latent_run_evaluates_its_decoded_samples_during_training_as_ddpm_eval_does(tmp_path, capsys):
    import csv

    mnist = ["data.dataset=mnist", "data.split=test"]  # 500 digits: the classifier's 28x28
    ae = _train_ae(tmp_path, "ae28", 2, mnist)
    cfg = load_config(None, LDM + mnist + [f"model.autoencoder={ae}", f"train.out_dir={tmp_path}", "train.name=ldm",
                                           "train.steps=2", "train.eval_every=2", "train.eval_n=130",
                                           "train.eval_steps=2", "train.eval_metrics=[fid,kid]"])
    run = train(cfg, progress=False)
    row = list(csv.DictReader((run / "eval.csv").open()))[-1]
    assert int(row["step"]) == 2 and float(row["fid"]) > 0
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "130", "--steps", "2", "--metrics", "fid,kid", "--device", "cpu",
                 "--no-progress"]) == 0
    result = json.loads(next((run / "eval").glob("*.json")).read_text())
    # the same decoded pixels against the same images (eval.csv keeps 6 significant digits)
    assert result["metrics"]["fid"] == pytest.approx(float(row["fid"]), rel=1e-5)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_exported_latent_pipeline_samples_what_ddpmlab_samples(tmp_path, ae_run, kind, capsys):
    import diffusers

    from ddpmlab.samplers.generate import generate

    extra = [] if kind == "unet" else ["model.kind=dit", "dit.depth=1", "dit.hidden=16",
                                       "dit.heads=2", "dit.patch_size=2", "model.num_classes=10"]
    cfg = load_config(None, LDM + [f"model.autoencoder={ae_run}", f"train.out_dir={tmp_path}", "train.name=r",
                                   "train.steps=2", *extra])
    run_dir = train(cfg, progress=False)
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    pipeline = {"unet": diffusers.LDMPipeline, "dit": diffusers.DiTPipeline}[kind]
    assert pipeline.__name__ in capsys.readouterr().out
    pipe = pipeline.from_pretrained(str(tmp_path / "out"))
    run = load_run(run_dir, "ema", "cpu")
    assert run.codec.shift != 0  # the shift is folded into the exported VAE's convolutions
    labels = torch.tensor([3, 7]) if kind == "dit" else None
    z = generate(run.model, run.schedule, run.shape, 2, sampler="ddim", steps=2, spacing="leading", clip_x0=None,
                 labels=labels, seed=0, progress=False)  # diffusers' DDIM: "leading" steps 500, 0
    ours = ((run.codec.decode(z) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    g = torch.Generator().manual_seed(0)
    if kind == "dit":
        theirs = pipe(class_labels=[3, 7], guidance_scale=1.0, num_inference_steps=2, generator=g,
                      output_type="np").images
    else:
        theirs = pipe(batch_size=2, num_inference_steps=2, generator=g, output_type="np").images
    assert theirs.shape == ours.shape == (2, 8, 8, 1)
    assert np.abs(theirs - ours).max() < 1e-4  # float32 through the same weights, steps and decoder


def test_a_damaged_autoencoder_json_is_a_one_line_error(tmp_path, ae_run, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(ae_run, ae)
    (ae / AE_STATS_FILE).write_text('{"psnr_db": 30.1, "scale')  # cut short by a kill
    assert main(["train", "--no-progress", *LDM, f"model.autoencoder={ae}", f"train.out_dir={tmp_path}",
                 "train.name=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{AE_STATS_FILE} is damaged" in err[0] and "train-autoencoder --resume" in err[0]


def test_bad_autoencoder_path_is_a_one_line_error(tmp_path, capsys):
    cfg = load_config(None, LDM + [f"model.autoencoder={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="nothing' does not exist; it must be a run folder of `ddpm train-autoenc"):
        data_shape(cfg)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--no-progress", *LDM, f"model.autoencoder={tmp_path / 'empty'}",
                 f"train.out_dir={tmp_path}", "train.name=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err and "config.json" in err
    assert not (tmp_path / "x").exists()  # refused before a run folder was made
