"""ControlNet on a text run (own GLIDE-style encoder, pixels): the copy includes the cross-attention blocks and reads
the base's text condition; a fresh ControlNet leaves the text base bit-identical for any prompt and control; a
ControlNet run reads the base's captions (emptied at controlnet.label_dropout) and resumes bit for bit; `ddpm sample
--prompt --controlnet --control` steers the text base (scale 0 is the base, bit for bit)."""

import numpy as np
import pytest
import torch
from _text_runs import one_thread_main, shapes_folder, train_text
from _util import perturb
from PIL import Image
from safetensors.torch import load_file, save_file

from ddpmlab.models.controlnet import ControlledUNet, build_controlnet
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_to_image import PromptTokens
from ddpmlab.runs import load_run
from ddpmlab.runs.control import load_controlnet
from ddpmlab.training.tasks.controlnet import train_controlnet

pytest.importorskip("tokenizers")
pytestmark = pytest.mark.usefixtures("one_thread")

CN = ["train.steps=4", "train.save_every=2", "train.grad_accum_steps=2", "train.lr=3e-3", "controlnet.detector=edges",
      "train.sample_n=2", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny own-encoder text run (2 steps; its EMA denoiser then random, so that its output is far from zero) on
    captioned 8x8 shapes and a 4-step edge ControlNet on it."""
    root = tmp_path_factory.mktemp("cn_text")
    base = train_text(shapes_folder(root / "data"), root, "base", 2, "unet.positions=false")  # one that exports
    model = load_run(base, "ema", "cpu").model
    perturb(model.denoiser, seed=1, scale=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(base / "checkpoints" / "step_0000002" / "ema.safetensors"))
    assert one_thread_main(["train-controlnet", str(base), *CN, f"train.out_dir={root}", "train.name=cn"]) == 0
    return base, root / "cn"


def _checkpoint(run, step, part):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


def test_a_fresh_controlnet_copies_the_cross_attention_and_leaves_the_text_base_bit_identical(runs):
    run = load_run(runs[0], "ema", "cpu")
    torch.manual_seed(0)
    net = build_controlnet(run.cfg, run.model)
    base_keys = {k for k in run.model.denoiser.state_dict() if not k.startswith(("up.", "norm_out.", "conv_out."))}
    assert set(net.encoder.state_dict()) == base_keys and any("attn2" in k for k in base_keys)  # cross-attention
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([3.0, 40.0, 500.0, 990.0])
    tokens = run.model.tokenize(["a red square", "bar in blue", "", "a white bar"])
    with torch.no_grad():
        for cond in (tokens, run.model.encode(["a red square", "bar in blue", "", "a white bar"])):
            expected = run.model(x, t, None, cond)
            for control, scale in ((torch.rand(4, 3, 8, 8, generator=g), 1.0), (torch.ones(1, 3, 8, 8) * 1e3, 2.5)):
                assert torch.equal(ControlledUNet(run.model, [(net, control, scale)])(x, t, None, cond), expected)
        # the copy reads the text: a trained (here: random) ControlNet's residuals differ between prompts
        perturb(net, seed=3, scale=0.2)
        control = torch.rand(4, 3, 8, 8, generator=g)
        a = net(x, t, None, run.model.encode(["a red square"] * 4), control)
        b = net(x, t, None, run.model.encode(["bar in blue"] * 4), control)
        assert (a[1] - b[1]).abs().max() > 1e-3
    assert isinstance(tokens, PromptTokens)


def test_a_text_controlnet_run_resumes_bit_identically_and_reads_the_captions(runs, tmp_path, capsys):
    base, straight = runs
    args = [a for a in CN if "=" in a] + [f"train.out_dir={tmp_path}", "train.name=stopped"]
    train_controlnet(str(base), args, progress=False, stop_after=2)
    stopped = tmp_path / "stopped"
    capsys.readouterr()
    assert one_thread_main(["train-controlnet", "--resume", str(stopped), "--no-progress"]) == 0
    assert any(line.startswith(f"resuming {stopped}") for line in capsys.readouterr().out.splitlines())
    for part in ("model", "ema", "optimizer"):
        a, b = _checkpoint(straight, 4, part), _checkpoint(stopped, 4, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # the captions reach the training step: every prompt emptied trains other weights than none emptied
    trained = {}
    for p in (0.0, 1.0):
        assert one_thread_main(["train-controlnet", str(base), *CN, "train.steps=1", f"controlnet.label_dropout={p}",
                                f"train.out_dir={tmp_path}", f"train.name=drop{p}"]) == 0
        trained[p] = _checkpoint(tmp_path / f"drop{p}", 1, "model")
    assert any(not torch.equal(trained[0.0][k], trained[1.0][k]) for k in trained[0.0])


def test_ddpm_sample_steers_the_text_base_with_prompt_and_control(runs, tmp_path):
    base, cn = runs
    edges = np.zeros((8, 8, 3), np.uint8)
    edges[2:6, 2] = edges[2:6, 5] = edges[2, 2:6] = edges[5, 2:6] = 255
    Image.fromarray(edges).save(tmp_path / "c.png")
    common = ["--guidance", "3", "--sampler", "ddim", "--steps", "3", "--n", "2",
              "--seed", "4", "--npz", "--no-progress"]

    def drawn(name, *more):
        assert one_thread_main(["sample", str(base), *common, *more, "--out", str(tmp_path / f"{name}.png")]) == 0
        return np.load(tmp_path / f"{name}.npz")["samples"]

    _, net = load_controlnet(cn)
    perturb(net, seed=6, scale=0.1)  # a ControlNet whose residuals are far from zero, saved as the run's EMA
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(cn / "checkpoints" / "step_0000004" / "ema.safetensors"))
    red = ["--prompt", "a red square"]
    plain = drawn("plain", *red)
    steer = ["--controlnet", str(cn), "--control", str(tmp_path / "c.png")]
    assert np.array_equal(drawn("zero", *red, *steer, "--control-scale", "0"), plain)  # the base, bit for bit
    steered = drawn("steered", *red, *steer)
    assert np.abs(steered - plain).max() > 1e-2
    blue = drawn("blue", "--prompt", "bar in blue", *steer)  # the prompt still steers the steered base
    assert np.abs(steered - blue).max() > 1e-3


def test_ddpm_export_writes_the_controlnet_model_alone_where_the_base_has_no_pipeline(runs, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    capsys.readouterr()
    assert one_thread_main(["export", str(runs[1]), str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "ControlNetModel.from_pretrained" in said[0]
    assert "no StableDiffusionControlNetPipeline: its base is no StableDiffusionPipeline: text.encoder=own" in said[0]
    theirs = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "out")).eval()
    assert not (tmp_path / "out" / "model_index.json").exists()
    run, (_, ours) = load_run(runs[0], "ema", "cpu"), load_controlnet(runs[1])
    g = torch.Generator().manual_seed(7)
    x, control = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    encoded = run.model.encode(["a red square", "bar in blue"])
    cond = TextCondition(encoded.tokens, None, encoded.pooled)  # ControlNetModel reads every token: no mask
    with torch.no_grad():
        skips, mid = ours(x, torch.tensor([4.0, 600.0]), None, cond, control)
        out = theirs(x, torch.tensor([4.0, 600.0]), encoder_hidden_states=cond.tokens, controlnet_cond=control,
                     class_labels=cond.pooled)
    torch.testing.assert_close(out.mid_block_res_sample, mid, atol=1e-5, rtol=1e-5)
