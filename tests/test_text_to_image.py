"""Text-to-image end to end on tiny runs: a captioned folder trains a UNet that cross-attends to an own
(GLIDE-style) or a frozen encoder's text, resumes bit-identically, and `ddpm sample RUN --prompt` draws;
classifier-free guidance on text; prompts batched equal prompts alone; the one-line errors."""

import json
import warnings

import numpy as np
import pytest
import torch
from _text_runs import clip_folder
from _util import perturb
from PIL import Image
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.models.text import build_text_encoder
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_to_image import PromptTokens, TextToImage, build_text_to_image
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.runs.prompts import PROMPTS_FILE, load_run_prompts
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.guidance import TextGuidance
from ddpmlab.samplers.registry import get_sampler
from ddpmlab.training.text import TextTraining

transformers = pytest.importorskip("transformers")

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "white": (240, 240, 240)}
TINY = ["--config", "shapes_text", "data.image_size=[8,8]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
        "unet.attention_resolutions=[4]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=16",
        "text.width=16", "text.depth=1", "text.heads=2", "text.max_length=12", "text.caption_dropout=0.3",
        "train.minutes=null", "train.batch_size=4", "train.save_every=3", "train.sample_n=4",
        "train.sample_steps=2", "train.log_every=1", "train.mixed_precision=no", "train.ema_start=0",
        "train.warmup_steps=2", "--no-progress"]
NO_CAPTION = "nothing"  # an image of the folder with the empty caption only


def _captioned_folder(root):
    """8 pictures of 8x8: a square or a bar of one colour, in metadata.jsonl with two wordings each (one
    with the empty caption only)."""
    root.mkdir()
    lines = []
    for i, (colour, rgb) in enumerate(list(COLOURS.items()) * 2):
        shape = "square" if i < 4 else "bar"
        img = np.zeros((8, 8, 3), np.uint8)
        img[2:6, 2:6] = rgb if shape == "square" else 0
        img[:, 3:5] = rgb if shape == "bar" else img[:, 3:5]
        Image.fromarray(img).save(root / f"{i}.png")
        text = [""] if i == 7 else [f"a {colour} {shape}", f"{shape} in {colour}"]
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _captioned_folder(tmp_path_factory.mktemp("data") / "pictures")


def _train(args, root, name, steps, resume=False):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if resume:
            return main(["train", "--resume", str(root / name), f"train.steps={steps}", "--no-progress"])
        return main(["train", *TINY, *args, f"train.steps={steps}", f"train.out_dir={root}", f"train.name={name}"])
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def own_run(folder, tmp_path_factory):
    """A 6-step run of the own encoder, uninterrupted (read-only)."""
    root = tmp_path_factory.mktemp("runs")
    assert _train([f"data.path={folder}"], root, "straight", 6) == 0
    return root / "straight"


def test_an_own_encoder_text_run_resumes_bit_identically(own_run, folder, tmp_path):
    assert _train([f"data.path={folder}"], tmp_path, "stopped", 3) == 0
    assert _train([], tmp_path, "stopped", 6, resume=True) == 0
    end = "checkpoints/step_0000006"
    for name in ("model", "ema", "optimizer"):
        a, b = (load_file(str(d / end / f"{name}.safetensors")) for d in (own_run, tmp_path / "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_own_encoder_trains_with_the_denoiser_and_is_restored_from_the_checkpoint(own_run):
    ckpt = load_file(str(own_run / "checkpoints/step_0000006/model.safetensors"))
    encoder_keys = [k for k in ckpt if k.startswith("text_encoder.")]
    assert encoder_keys and all(k.startswith(("text_encoder.", "denoiser.")) for k in ckpt)
    cfg = load_config(str(own_run / "config.yaml"))
    torch.manual_seed(cfg.train.seed)  # the weights the run started from
    start = build_text_to_image(cfg, build_text_encoder(cfg.text, own_run)).state_dict()
    assert all(not torch.equal(start[k], ckpt[k]) for k in encoder_keys if k.endswith("token_embedding.weight"))
    assert sum(not torch.equal(start[k], ckpt[k]) for k in encoder_keys) > len(encoder_keys) // 2
    run = load_run(own_run, "model", "cpu")
    assert isinstance(run.model, TextToImage)
    got = run.model.text_encoder.state_dict()
    assert all(torch.equal(got[k.removeprefix("text_encoder.")], ckpt[k]) for k in encoder_keys)
    assert (own_run / "tokenizer.json").is_file()
    assert load_run_prompts(own_run) == run.prompts and 1 <= len(run.prompts) <= 4 and "" not in run.prompts


def test_ddpm_sample_draws_prompts_grouped_per_prompt(own_run, tmp_path, capsys):
    out = tmp_path / "two"
    assert main(["sample", str(own_run), "--prompt", "a red square", "--prompt", "bar in blue", "--n", "3",
                 "--out", f"{out}/", "--npz", "--no-progress"]) == 0
    x = np.load(out / "samples.npz")["samples"]
    assert x.shape == (6, 3, 8, 8) and np.isfinite(x).all() and (out / "grid.png").is_file()
    with Image.open(out / "grid.png") as grid:  # a row per prompt: 3 across, 2 down
        assert grid.size[0] > grid.size[1]
    (tmp_path / "prompts.txt").write_text("a red square\n\nbar in blue\n")
    assert main(["sample", str(own_run), "--prompts", str(tmp_path / "prompts.txt"), "--n", "3", "--out",
                 f"{tmp_path / 'file'}/", "--npz", "--no-progress"]) == 0
    assert np.array_equal(x, np.load(tmp_path / "file" / "samples.npz")["samples"])
    capsys.readouterr()
    assert main(["sample", str(own_run), "--n", "4", "--out", str(tmp_path / "own.png"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "prompts: the run's own" in said and str(PROMPTS_FILE) in said
    run = load_run(own_run, device="cpu")
    plan = plan_request(run, SamplingRequest(n=4), log=lambda m: None)
    assert plan.n == 4 and set(plan.prompts) <= set(run.prompts)


def _perturbed_run(run_dir):
    """The run with random weights everywhere (6 steps leave the text's influence tiny)."""
    run = load_run(run_dir, device="cpu")
    perturb(run.model, seed=5, scale=0.2)
    return run


def test_guidance_with_the_prompt_as_negative_prompt_is_the_conditional_model(own_run):
    run = _perturbed_run(own_run)
    asked = dict(sampler="flow_euler", steps=3, n=3, seed=1, prompts=["a red square"])
    cond = draw_samples(run, plan_request(run, SamplingRequest(guidance=1.0, **asked), log=print), progress=False)
    same = plan_request(run, SamplingRequest(guidance=5.0, negative_prompt="a red square", **asked), log=print)
    assert torch.equal(draw_samples(run, same, progress=False), cond)
    other = plan_request(run, SamplingRequest(guidance=5.0, **asked), log=print)
    assert not torch.allclose(draw_samples(run, other, progress=False), cond, atol=1e-4)


def test_text_guidance_is_eq_6_of_the_prompt_and_the_unconditional_prompt(own_run):
    model = _perturbed_run(own_run).model
    with torch.no_grad():
        c, u = model.encode(["a red square", "bar in blue"]), model.encode(["", "a green bar"])
        x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
        want = model(x, t, cond=u) + 4.0 * (model(x, t, cond=c) - model(x, t, cond=u))
        assert torch.allclose(TextGuidance(model, c, u, 4.0)(x, t), want, atol=1e-5)
        assert torch.equal(TextGuidance(model, c, u, 0.0)(x, t), model(x, t, cond=u))


def test_a_batch_of_prompts_equals_each_prompt_sampled_alone(own_run):
    run = _perturbed_run(own_run)
    prompts = ["a red square", "bar in blue", "a white bar"]
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def sample(ps, x):
        plan = plan_request(run, SamplingRequest("flow_euler", 4, n=1, guidance=3.0, prompts=ps), log=lambda m: None)
        predict = ModelPredictor(plan.model, run.schedule, run.cfg.diffusion.prediction, clip_x0=1.0)
        return get_sampler("flow_euler")(predict, run.schedule, x, 4, **plan.options)

    with torch.no_grad():
        together = sample(prompts, x_T)
        alone = torch.cat([sample([p], x_T[i:i + 1]) for i, p in enumerate(prompts)])
    assert torch.allclose(together, alone, atol=1e-5) and not torch.allclose(together[0], together[1])


def test_prompt_and_class_errors_and_a_long_prompt_are_one_line(own_run, tmp_path, capsys):
    from test_docs import FIXTURE_RUN  # a run without text

    capsys.readouterr()
    assert main(["sample", str(FIXTURE_RUN), "--prompt", "a cat", "--out", str(tmp_path / "a.png")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]  # an old run
    assert len(err) == 1 and "--prompt 'a cat'" in err[0] and "text.encoder is null" in err[0], err
    assert "--class" in err[0] and "--config shapes_text" in err[0]
    assert main(["sample", str(own_run), "--class", "3", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--class 3" in err[0] and "without classes" in err[0] and "--prompt" in err[0], err
    long = " ".join(["red square"] * 10)
    with pytest.warns(UserWarning) as caught:  # the prompt's 3 samples: one warning
        assert main(["sample", str(own_run), "--prompt", long, "--n", "3", "--out", str(tmp_path / "c.png"),
                     "--no-progress"]) == 0
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message and message.startswith("prompt 'red square red")
    assert "has 22 tokens but the run's text encoder reads 12: truncated" in message


def test_a_ddpm_latent_text_run_trains_and_samples_pixels(folder, tmp_path):
    from diffusers import AutoencoderKL

    vae = tmp_path / "vae"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4).save_pretrained(vae)
    args = [f"data.path={folder}", f"model.autoencoder={vae}", "diffusion.process=ddpm", "diffusion.prediction=eps",
            "unet.attention_resolutions=[2]", "train.sample_sampler=ddim", f"train.out_dir={tmp_path}"]
    assert _train(args, tmp_path, "latent", 3) == 0
    out = tmp_path / "s.png"
    assert main(["sample", str(tmp_path / "latent"), "--prompt", "a red square", "--n", "2", "--npz", "--out",
                 str(out), "--no-progress"]) == 0
    assert np.load(out.with_suffix(".npz"))["samples"].shape == (2, 3, 8, 8)  # decoded to pixels


def test_a_frozen_clip_run_trains_on_cached_embeddings(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path / "cache"))
    clip = clip_folder(tmp_path / "clip", (*COLOURS, "square", "bar", "in"))
    args = [f"data.path={folder}", f"text.encoder={clip}"]
    capsys.readouterr()
    assert _train(args, tmp_path, "frozen", 3) == 0
    assert "encoded once into" in capsys.readouterr().out and list((tmp_path / "cache" / "text").glob("*"))
    ckpt = load_file(str(tmp_path / "frozen" / "checkpoints/step_0000003/model.safetensors"))
    assert all(k.startswith("denoiser.") for k in ckpt)  # the frozen encoder is read from its folder
    assert _train(args, tmp_path, "again", 1) == 0 and "read from" in capsys.readouterr().out
    run = load_run(tmp_path / "frozen", device="cpu")
    cfg = run.cfg
    text = TextTraining(cfg, [(c,) for c in ("a red square", "bar in blue", "")])
    text.embeddings = None
    text.load(_accelerator(), True, False)  # reads the cache
    cached = text.condition(run.model, torch.tensor([0, 1]), 0, torch.ones(2))
    with torch.no_grad():
        direct = run.model.encode(["a red square", "bar in blue"])
    assert isinstance(cached, TextCondition) and torch.allclose(cached.tokens, direct.tokens, atol=1e-5)
    assert main(["sample", str(tmp_path / "frozen"), "--prompt", "a blue bar", "--n", "2", "--out",
                 str(tmp_path / "f.png"), "--no-progress"]) == 0


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_the_own_encoder_reads_prompt_tokens_in_the_forward_pass(own_run):
    model = load_run(own_run, "model", "cpu").model
    tokens = model.tokenize(["a red square", ""])
    assert isinstance(tokens, PromptTokens) and len(tokens.chunk(2)[1]) == 1
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = model(x, torch.tensor([10, 900]), cond=tokens)
    out.square().mean().backward()
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0  # the encoder learns from the loss
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(model(x, torch.tensor([10, 900]), cond=model.encode(["a red square", ""])), out,
                              atol=1e-6)


def test_class_labels_work_beside_the_text_on_a_shapes_folder(tmp_path):
    from ddpmlab.data.shapes import ShapesSpec
    from ddpmlab.data.shapes_folder import write_shapes_folder

    spec = ShapesSpec.of(sizes=["large"], colours=["red", "blue"], shapes=["circle", "square"], positions=["left"])
    data = write_shapes_folder(tmp_path / "shapes", n=8, size=28, spec=spec, progress=False)
    assert _train([f"data.path={data}", "model.num_classes=4", "train.label_dropout=0.2"], tmp_path, "both", 2) == 0
    run = load_run(tmp_path / "both", device="cpu")
    assert run.num_classes == 4 and run.class_names and run.prompts
    plan = plan_request(run, SamplingRequest(label=run.class_names[1], prompts=["a red circle"], n=2), log=print)
    assert plan.labels.tolist() == [1, 1] and isinstance(plan.model, TextGuidance)
    x = draw_samples(run, plan, progress=False)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_a_text_dit_run_trains_and_a_width_mismatch_is_one_line_before_any_folder(folder, tmp_path, capsys):
    dit = [f"data.path={folder}", "model.kind=dit", "unet.context_dim=null", "unet.pooled_dim=null", "dit.depth=1",
           "dit.hidden=16", "dit.heads=2", "dit.patch_size=2", "dit.pooled_dim=16"]
    assert _train([*dit, "dit.context_dim=16"], tmp_path, "dit", 2) == 0
    assert isinstance(load_run(tmp_path / "dit", device="cpu").model, TextToImage)
    capsys.readouterr()
    assert _train([*dit, "dit.context_dim=8"], tmp_path, "narrow", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dit.context_dim=8" in err[0] and "set dit.context_dim=16" in err[0], err
    assert not (tmp_path / "narrow").exists()
