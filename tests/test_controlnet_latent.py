"""ControlNet on a latent text run (Stable Diffusion's recipe: a UNet on a frozen CLIP, a KL autoencoder): the control
is a picture of the images' size that the hint encoder brings down to the latents'; the run trains on cached latents
and caption embeddings and resumes bit for bit; `ddpm export CN_RUN OUT` writes a StableDiffusionControlNetPipeline
(ControlNetModel in OUT/controlnet) that draws, from the same first latents, prompts, control, scale, guidance and
DDIM steps, the images `ddpm sample BASE --controlnet CN --control ...` draws (diffusers is the reference, 1e-4);
where the pipeline does not map the ControlNetModel is written alone with a one-line reason.  Every part is tiny,
random and written here by transformers and diffusers (nothing is downloaded)."""

import numpy as np
import pytest
import torch
from _text_runs import clip_folder, one_thread_main, shapes_folder
from _util import perturb
from PIL import Image
from safetensors.torch import load_file, save_file

from ddpmlab.config import load_config
from ddpmlab.io.checkpoint import newest_weights
from ddpmlab.io.diffusers_controlnet import pipeline_refusal
from ddpmlab.models.controlnet import ControlledUNet, build_controlnet
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.runs.control import load_controlnet, with_controlnets
from ddpmlab.training.tasks.controlnet import train_controlnet

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = ["--config", "shapes_text", "data.image_size=[8,8]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
          "unet.attention_resolutions=[2]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=null",
          "unet.num_heads=2", "text.max_length=10", "text.caption_dropout=0.3", "diffusion.process=ddpm",
          "diffusion.prediction=eps", "diffusion.num_timesteps=99", "train.minutes=null", "train.batch_size=4",
          "train.sample_n=2", "train.sample_steps=2", "train.sample_sampler=ddim", "train.log_every=1",
          "train.mixed_precision=no", "train.device=cpu", "unet.positions=false", "--no-progress"]
CN = ["train.steps=4", "train.save_every=2", "train.grad_accum_steps=2", "train.lr=3e-3", "controlnet.detector=edges",
      "train.sample_n=2"]
PROMPTS = ["a red square", "bar in blue"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _randomised(path, model, part=None):
    """``model``'s weights (those of its ``part``) made random and saved as the checkpoint's EMA (a one-step run's
    output is near zero)."""
    perturb(model if part is None else getattr(model, part), seed=3, scale=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "ema.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Captioned 8x8 shapes, a tiny random CLIP and AutoencoderKL (latents 4x4x4), a one-step latent text run on them
    (its EMA UNet random), and a 4-step edge ControlNet on it."""
    root = tmp_path_factory.mktemp("cn_latent")
    mp = pytest.MonkeyPatch()
    mp.setenv("DDPMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                            norm_num_groups=4, scaling_factor=0.7, shift_factor=0.2).save_pretrained(root / "vae")
    assert one_thread_main(["train", *LATENT, "train.steps=1", f"data.path={shapes_folder(root / 'data')}",
                            f"model.autoencoder={root / 'vae'}", f"text.encoder={clip_folder(root / 'clip')}",
                            f"train.out_dir={root}", "train.name=base"]) == 0
    _randomised(newest_weights(root / "base", "ema")[0], load_run(root / "base", "ema", "cpu").model,
               "denoiser")
    assert one_thread_main(["train-controlnet", str(root / "base"), *CN, f"train.out_dir={root}", "train.name=cn",
                            "--no-progress"]) == 0
    mp.undo()
    return root


def _checkpoint(run, step, part):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


def test_the_hint_encoder_takes_a_picture_of_the_images_size_down_to_the_latents(runs):
    run = load_run(runs / "base", "ema", "cpu")
    _, net = load_controlnet(runs / "cn")
    assert run.shape == (4, 4, 4) and run.image_shape == (3, 8, 8)
    assert net.hint_channels == (16, 32) and net.control_shape(run.shape) == (3, 8, 8)  # one stride-2 step
    torch.manual_seed(0)
    fresh = build_controlnet(run.cfg, run.model)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([5.0, 90.0])
    cond = run.model.encode(PROMPTS)
    with torch.no_grad():  # a fresh ControlNet on the latent text base: its output bit for bit
        steered = ControlledUNet(run.model, [(fresh, torch.rand(2, 3, 8, 8), 1.0)])
        assert torch.equal(steered(x, t, None, cond), run.model(x, t, None, cond))


def test_a_latent_text_controlnet_run_resumes_bit_identically(runs, tmp_path, capsys):
    train_controlnet(str(runs / "base"), [*CN, f"train.out_dir={tmp_path}", "train.name=stopped"], progress=False,
                     stop_after=2)
    capsys.readouterr()
    assert one_thread_main(["train-controlnet", "--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "read from" in out  # cached latents and caption embeddings
    for part in ("model", "ema", "optimizer"):
        a, b = _checkpoint(runs / "cn", 4, part), _checkpoint(tmp_path / "stopped", 4, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def _ours(runs, cn, control, scale, guidance):
    """ddpm sample BASE --controlnet CN --control C --control-scale S --prompt ... --sampler ddim --step-schedule
    trailing --steps 3 --guidance G --n 2: (images in [0, 1], the first latents)."""
    run = with_controlnets(load_run(runs / "base", "ema", "cpu"), [str(cn)], [str(control)], [scale],
                           say=lambda m: None)
    plan = plan_request(run, SamplingRequest(sampler="ddim", steps=3, step_schedule="trailing", prompts=PROMPTS,
                                             guidance=guidance, n=2, seed=0), log=lambda m: None)
    images = ((draw_samples(run, plan, progress=False) + 1) / 2).clamp(0, 1)
    return images, torch.randn((4, *run.shape), generator=torch.Generator().manual_seed(0))


def test_ddpm_export_writes_a_controlnet_pipeline_that_draws_ddpmlabs_images(runs, tmp_path, capsys):
    cn = tmp_path / "cn"
    __import__("shutil").copytree(runs / "cn", cn)
    _, net = load_controlnet(cn)
    _randomised(newest_weights(cn, "ema")[0], net)
    control = np.zeros((8, 8, 3), np.uint8)
    control[2:6, 2] = control[2:6, 5] = 255
    control[0] = (30, 200, 90)
    Image.fromarray(control).save(tmp_path / "c.png")
    capsys.readouterr()
    assert one_thread_main(["export", str(cn), str(tmp_path / "out")]) == 0
    assert "StableDiffusionControlNetPipeline.from_pretrained" in capsys.readouterr().out
    assert isinstance(diffusers.ControlNetModel.from_pretrained(str(tmp_path / "out" / "controlnet")),
                      diffusers.ControlNetModel)
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(str(tmp_path / "out"))
    pipe.set_progress_bar_config(disable=True)
    plain, _ = _ours(runs, cn, tmp_path / "c.png", 0.0, 4.0)
    for scale, guidance in ((1.0, 1.0), (0.7, 4.0)):  # conditional; guided from the empty prompt
        ours, latents = _ours(runs, cn, tmp_path / "c.png", scale, guidance)
        with torch.no_grad():
            theirs = pipe(PROMPTS, image=Image.open(tmp_path / "c.png"), num_images_per_prompt=2,
                          guidance_scale=guidance, num_inference_steps=3, latents=latents, output_type="pt",
                          controlnet_conditioning_scale=scale).images
        assert theirs.shape == ours.shape == (4, 3, 8, 8)
        assert (theirs - ours).abs().max() < 1e-4  # float32 through the same weights and steps (measured ~5e-7)
    assert (ours - plain).abs().max() > 0.05  # the control changes the images: it is compared too


def test_what_does_not_map_to_the_pipeline_is_named_in_one_line(runs):
    _, net = load_controlnet(runs / "cn")
    keys = [a for a in LATENT if "=" in a] + [f"text.encoder={runs / 'clip'}", f"model.autoencoder={runs / 'vae'}"]
    cfg = load_config("shapes_text", keys)
    assert pipeline_refusal(cfg, net) is None
    for more, culprit in ((["text.encoder=own", "text.width=16"], "text.encoder=own does not map"),
                          (["model.num_classes=2"], "model.num_classes=2 does not map"),
                          (["diffusion.process=flow", "diffusion.prediction=velocity"], "diffusion.process=flow")):
        why = pipeline_refusal(load_config("shapes_text", keys + more), net)
        assert culprit in why and "\n" not in why, why
    gray = build_controlnet(load_config("shapes_text", keys + ["controlnet.control_channels=1"]))
    assert "reads control pictures as RGB (3 channels)" in pipeline_refusal(cfg, gray)
