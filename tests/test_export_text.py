"""ddpm export of text runs: a latent UNet run on a frozen CLIP as diffusers' StableDiffusionPipeline and a latent
DiT run on a frozen T5 as PixArtAlphaPipeline draw, from the same first latents, prompts, guidance and DDIM steps,
the images ddpmlab's sampler draws (diffusers is the reference); what does not map is a one-line refusal naming it.
Every part is tiny, random and written here by transformers and diffusers (nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch
from _text_runs import clip_folder
from _util import perturb
from PIL import Image
from safetensors.torch import save_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.io.checkpoint import newest_weights, save_run_config
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

WORDS = ["a", "red", "blue", "green", "square", "bar", "in"]
PROMPTS = ["a red square", "bar in blue"]
TINY = ["--config", "shapes_text", "data.image_size=[8,8]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
        "unet.attention_resolutions=[2]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=null",
        "unet.num_heads=2", "text.max_length=10", "text.caption_dropout=0.3", "diffusion.process=ddpm",
        "diffusion.prediction=eps", "diffusion.num_timesteps=99", "train.minutes=null", "train.batch_size=4",
        "train.steps=1", "train.sample_n=2", "train.sample_steps=2", "train.sample_sampler=ddim",
        "train.log_every=1", "train.mixed_precision=no", "train.device=cpu", "unet.positions=false", "--no-progress"]
DIT = ["model.kind=dit", "unet.context_dim=null", "dit.depth=1", "dit.hidden=16", "dit.heads=2", "dit.patch_size=2",
       "dit.context_dim=16", "dit.pooled_dim=null", "diffusion.prediction=v"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch, one_thread):
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A captioned folder of 8x8 pictures, a tiny CLIPTextModel and T5EncoderModel with their tokenizers, and
    an AutoencoderKL with a latent scale and shift, each written by its own library."""
    root = tmp_path_factory.mktemp("parts")
    (root / "data").mkdir()
    lines = []
    colours = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20)}
    for i, (colour, shape) in enumerate([(c, s) for c in colours for s in ("square", "bar")]):
        img = np.zeros((8, 8, 3), np.uint8)
        img[2:6, 2:6 if shape == "square" else 4] = colours[colour]
        Image.fromarray(img).save(root / "data" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a {colour} {shape}", f"{shape} in {colour}"]}))
    (root / "data" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                            norm_num_groups=4, scaling_factor=0.7, shift_factor=0.2).save_pretrained(root / "vae")
    clip_folder(root / "clip", WORDS[1:])
    _t5(root / "t5")
    return root


def _t5(folder):
    """A word-level T5 tokenizer over the WORDS and a random T5EncoderModel."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>", model_max_length=32).save_pretrained(folder)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(2)
    transformers.T5EncoderModel(config).save_pretrained(folder)


def _trained(parts, root, name, extra=()):
    """A one-step run, its EMA weights then replaced by random ones (a fresh network's zero output layers would
    make every comparison trivial)."""
    args = [*TINY, f"data.path={parts / 'data'}", f"model.autoencoder={parts / 'vae'}", f"train.out_dir={root}",
            f"train.name={name}", *extra]
    assert main(["train", *args]) == 0
    run = root / name
    path = newest_weights(run, "ema")[0]
    model = load_run(run, "ema", "cpu").model
    fixed = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("pos_embed")}  # sin-cos, not learned
    perturb(model.denoiser, seed=3, scale=0.2)
    model.load_state_dict(fixed, strict=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "ema.safetensors"))
    return run


def _ours(run_dir, prompts, n, guidance, steps):
    """ddpm sample RUN --prompt ... --sampler ddim --step-schedule trailing: (images in [0, 1], first latents)."""
    run = load_run(run_dir, "ema", "cpu")
    plan = plan_request(run, SamplingRequest(sampler="ddim", steps=steps, step_schedule="trailing", prompts=prompts,
                                             guidance=guidance, n=n, seed=0))
    images = ((draw_samples(run, plan, progress=False) + 1) / 2).clamp(0, 1)
    latents = torch.randn((n * len(prompts), *run.shape), generator=torch.Generator().manual_seed(0))
    return images, latents


def _same_images(pipe, run_dir, guidance, **call):
    ours, latents = _ours(run_dir, PROMPTS, 2, guidance, steps=3)
    with torch.no_grad():
        theirs = pipe(PROMPTS, num_images_per_prompt=2, guidance_scale=guidance, num_inference_steps=3,
                      latents=latents, output_type="pt", **call).images
    assert theirs.shape == ours.shape == (4, 3, 8, 8)
    assert (ours[0] - ours[2]).abs().max() > 0.02  # the prompt changes the image: the text is compared too
    return (theirs - ours).abs().max().item()


def test_a_clip_unet_run_exports_as_a_stable_diffusion_pipeline_that_draws_ddpmlabs_images(parts, tmp_path, capsys):
    run = _trained(parts, tmp_path, "sd", [f"text.encoder={parts / 'clip'}"])
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "StableDiffusionPipeline.from_pretrained" in capsys.readouterr().out
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.tokenizer.model_max_length == 10 and pipe.scheduler.config.prediction_type == "epsilon"
    pipe.set_progress_bar_config(disable=True)
    for guidance in (1.0, 4.0):  # conditional; guided from the empty prompt
        assert _same_images(pipe, run, guidance) < 1e-4  # float32 through the same weights and steps


def test_a_t5_dit_run_exports_as_a_pixart_alpha_pipeline_that_draws_ddpmlabs_images(parts, tmp_path):
    run = _trained(parts, tmp_path, "pixart", [f"text.encoder={parts / 't5'}", *DIT])
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    err = _same_images(pipe, run, 3.0, use_resolution_binning=False, clean_caption=False, max_sequence_length=10)
    assert err < 1e-4


@pytest.mark.parametrize("extra, culprit", [
    (["text.encoder=own", "text.width=16", "text.depth=1", "text.heads=2"], "text.encoder=own does not map"),
    (["model.autoencoder=null", "CLIP"], "pixel-space text run"),
    (["diffusion.process=flow", "diffusion.prediction=velocity", "CLIP"], "diffusion.process=flow does not map"),
    (["unet.pooled_dim=16", "CLIP"], "unet.pooled_dim=16 does not map"),
    (["model.num_classes=2", "CLIP"], "model.num_classes=2 does not map"),
    (["T5"], "a UNet on a T5EncoderModel"),
    (["CLIP", *DIT], "a DiT on a CLIPTextModel"),
], ids=["own-encoder", "pixels", "flow", "pooled", "classes", "unet-t5", "dit-clip"])
def test_what_does_not_map_is_a_one_line_refusal_naming_it(parts, tmp_path, capsys, extra, culprit):
    encoders = {"CLIP": f"text.encoder={parts / 'clip'}", "T5": f"text.encoder={parts / 't5'}"}
    cfg = load_config("shapes_text", [a for a in TINY if "=" in a] + [
        f"data.path={parts / 'data'}", f"model.autoencoder={parts / 'vae'}", *[encoders.get(a, a) for a in extra]])
    (tmp_path / "r").mkdir()
    save_run_config(cfg, tmp_path / "r")  # refused from the config and the encoder, before any weights are read
    capsys.readouterr()
    assert main(["export", str(tmp_path / "r"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit in err[0], err
    assert not (tmp_path / "out").exists()
