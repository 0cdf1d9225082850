"""ControlNet (Zhang et al. 2023): a fresh ControlNet leaves the base's output bit-identical for any control image
(zero convolutions), and at its first step only those convolutions receive a gradient; several ControlNets add
their scaled residuals; diffusers' ControlNetModel computes the same residuals on mapped weights (1e-5) and reads
what `ddpm export` writes; a ControlNet run trains only the ControlNet, resumes bit for bit and samples its base;
bad input is refused in one line (--control alone, another base, a ControlNet sampled as a run)."""

import numpy as np
import pytest
import torch
from _util import TINY_DIGITS, perturb
from PIL import Image
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.io.checkpoint import save_checkpoint, save_run_config
from ddpmlab.io.diffusers_controlnet import controlnet_model, from_diffusers_controlnet, to_diffusers_controlnet
from ddpmlab.models import UNet, build_model
from ddpmlab.models.controlnet import ControlledUNet, ControlNet, build_controlnet, skip_channels
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.training.tasks.controlnet import train_controlnet

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["train.steps=6", "train.save_every=3", "train.lr=3e-3", "train.grad_accum_steps=2",
         "controlnet.detector=scribble"]
# a UNet with text cross-attention (it maps to UNet2DConditionModel, so its ControlNet to ControlNetModel)
TEXT_UNET = ["data.dataset=folder", "data.path=unused", "data.image_size=[16,16]", "data.channels=3",
             "unet.base_channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1",
             "unet.attention_resolutions=[8]", "unet.norm_groups=8", "unet.num_heads=2", "unet.dropout=0.0",
             "unet.context_dim=32"]


def _unet(base=16, classes=3):
    return perturb(UNet(in_channels=1, base_channels=base, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), norm_groups=8, num_classes=classes, image_size=(8, 8))).eval()


def _inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g) * 999, torch.arange(batch) % 4


def _checkpoint(run, step, part="model"):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


def _cn_args(base, out, name, *more):
    return [str(base), *STEPS, f"train.out_dir={out}", f"train.name={name}", *more]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny class-conditional digit run trained 4 steps, and a 6-step ControlNet on it (one thread)."""
    root = tmp_path_factory.mktemp("controlnet")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY_DIGITS, "train.steps=4", f"train.out_dir={root}", "train.name=base"]) == 0
        assert main(["train-controlnet", *_cn_args(root / "base", root, "cn"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "base", root / "cn"


# --- the network -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_a_fresh_controlnet_leaves_the_base_output_bit_identical_for_any_control(scale):
    base = _unet()
    x, t, y = _inputs()
    expected = base(x, t, y)
    g = torch.Generator().manual_seed(5)
    for control in (torch.rand(4, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g) * 1e4,
                    torch.zeros(4, 1, 8, 8)):
        torch.manual_seed(0)
        steered = ControlledUNet(base, [(ControlNet(base, 1), control, scale), (ControlNet(base, 1), control, 1.0)])
        assert torch.equal(steered(x, t, y), expected)


def test_at_the_first_step_only_the_zero_convolutions_get_a_gradient_and_the_base_none():
    """Zhang et al. 2023, Sec. 3.1: with Z = 0 the copy's gradient is 0, Z's is not (it sees the copy's features)."""
    base = _unet().requires_grad_(False)
    net = ControlNet(base, 1)
    x, t, y = _inputs()
    ControlledUNet(base, [(net, torch.rand(4, 1, 8, 8), 1.0)])(x, t, y).square().sum().backward()
    assert all(p.grad is None for p in base.parameters())
    zero = {n for n, _ in net.named_parameters() if n.startswith(("zero_convs.", "mid_out.", "hint.conv_out."))}
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in zero if n.endswith("weight") and
               not n.startswith("hint."))  # the hint's own zero conv waits for the copy's first update
    assert all(g is None or not g.any() for n, g in grads.items() if n not in zero)


def test_the_controlnet_starts_as_a_copy_of_the_base_encoder_with_a_zero_conv_per_skip():
    base = _unet()
    net = ControlNet(base, 1)
    copy = net.encoder.state_dict()
    assert copy.keys() == {k for k in base.state_dict() if not k.startswith(("up.", "norm_out.", "conv_out."))}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in copy.items())
    assert [z.in_channels for z in net.zero_convs] == skip_channels(base) == [16, 16, 16, 32]
    assert all(not z.weight.any() and not z.bias.any() for z in [*net.zero_convs, net.mid_out, net.hint.conv_out])


def test_several_controlnets_add_their_scaled_residuals_and_guidance_halves_share_the_controls():
    base = _unet()
    a, b = perturb(ControlNet(base, 1), 2), perturb(ControlNet(base, 1), 3)
    x, t, y = _inputs()
    g = torch.Generator().manual_seed(4)
    ca, cb = torch.rand(4, 1, 8, 8, generator=g), torch.rand(1, 1, 8, 8, generator=g)
    with torch.no_grad():
        (sa, ma), (sb, mb) = a(x, t, y, None, ca), b(x, t, y, None, cb.expand(4, -1, -1, -1))
        by_hand = base(x, t, y, residuals=([0.5 * p + 2.0 * q for p, q in zip(sa, sb)], 0.5 * ma + 2.0 * mb))
        steered = ControlledUNet(base, [(a, ca, 0.5), (b, cb, 2.0)])
        torch.testing.assert_close(steered(x, t, y), by_hand, rtol=1e-6, atol=1e-6)
        assert (by_hand - base(x, t, y)).abs().max() > 1e-3
        doubled = steered(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]))  # [cond; uncond] of guidance
        torch.testing.assert_close(doubled, torch.cat([by_hand, by_hand]), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="do not divide a batch of 6"):
            steered(x[:3].repeat(2, 1, 1, 1), t[:3].repeat(2), y[:3].repeat(2))


# --- diffusers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,hint", [([], (16,)), (["model.num_classes=3"], (8, 16))],
                         ids=["class-free", "classes-hint-stride"])
def test_diffusers_controlnet_model_gives_the_same_residuals_on_mapped_weights_to_1e5(overrides, hint):
    diffusers = pytest.importorskip("diffusers")
    cfg = load_config(None, TEXT_UNET + overrides)
    torch.manual_seed(0)
    base = perturb(build_model(cfg), 0, scale=0.2).eval()
    ours = perturb(ControlNet(base, 3, hint), 1, scale=0.2).eval()
    theirs = controlnet_model(cfg, ours)
    assert isinstance(theirs, diffusers.ControlNetModel)
    back = from_diffusers_controlnet(theirs.state_dict())
    assert back.keys() == ours.state_dict().keys() and all(torch.equal(back[k], v) for k, v in
                                                           ours.state_dict().items())
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, generator=g) * 999
    control = torch.rand(3, 3, 16 * ours.factor, 16 * ours.factor, generator=g)
    tokens = torch.randn(3, 5, 32, generator=g)
    y = torch.tensor([0, 2, 3]) if cfg.model.num_classes else None
    with torch.no_grad():
        skips, mid = ours(x, t, y, TextCondition(tokens), control)
        out = theirs(x, t, encoder_hidden_states=tokens, controlnet_cond=control, class_labels=y,
                     conditioning_scale=1.0)
    assert len(out.down_block_res_samples) == len(skips) and mid.abs().max() > 0.1
    for a, b in zip([*skips, mid], [*out.down_block_res_samples, out.mid_block_res_sample]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert to_diffusers_controlnet(ours.state_dict()).keys() == theirs.state_dict().keys()


def test_ddpm_export_writes_a_controlnet_model_folder_where_the_base_maps(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    cfg = load_config(None, TEXT_UNET + ["controlnet.base=base-run"])
    torch.manual_seed(0)
    net = perturb(build_controlnet(cfg, perturb(build_model(cfg), 0, scale=0.2)), 1, scale=0.2)
    run = tmp_path / "cn"
    run.mkdir()
    save_run_config(cfg, run)
    save_checkpoint(run, 1, net.state_dict(), net.state_dict(), {"state": {}, "param_groups": []})
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "ControlNetModel.from_pretrained" in capsys.readouterr().out
    theirs = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "out")).eval()
    g = torch.Generator().manual_seed(3)
    x, control, tokens = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g), \
        torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        skips, mid = net.eval()(x, torch.tensor([3.0, 700.0]), None, TextCondition(tokens), control)
        out = theirs(x, torch.tensor([3.0, 700.0]), encoder_hidden_states=tokens, controlnet_cond=control)
    torch.testing.assert_close(out.mid_block_res_sample, mid, atol=1e-5, rtol=1e-5)


# --- training and sampling ---------------------------------------------------------------------------------

def test_a_controlnet_run_resumes_bit_identically(runs, tmp_path, capsys):
    base, straight = runs
    train_controlnet(str(base), _cn_args(base, tmp_path, "stopped")[1:], progress=False, stop_after=3)
    stopped = tmp_path / "stopped"
    assert (stopped / "checkpoints" / "step_0000003").is_dir()
    capsys.readouterr()
    assert main(["train-controlnet", "--resume", str(stopped), "--no-progress"]) == 0
    assert any(line.startswith(f"resuming {stopped}") for line in capsys.readouterr().out.splitlines())
    for part in ("model", "ema", "optimizer"):
        a, b = _checkpoint(straight, 6, part), _checkpoint(stopped, 6, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_a_controlnet_run_trains_and_saves_only_the_controlnet(runs):
    base, cn = runs
    weights = _checkpoint(cn, 6)
    base_ema = _checkpoint(base, 4, "ema")
    assert all(k.startswith(("encoder.", "hint.", "zero_convs.", "mid_out.")) for k in weights)
    assert not any(k.startswith(("encoder.up.", "encoder.conv_out.")) for k in weights)
    assert not torch.equal(weights["encoder.conv_in.weight"], base_ema["conv_in.weight"])  # the copy trained
    assert weights["mid_out.weight"].any() and (cn / "samples" / "final.png").is_file()
    cfg = load_config(None, [])
    assert cfg.controlnet.base is None  # a plain config has no ControlNet


def test_ddpm_sample_steers_the_base_and_refuses_bad_input_in_one_line(runs, tmp_path, capsys):
    base, cn = runs
    square = np.zeros((16, 16), np.uint8)
    square[4:12, 4:12] = 255
    Image.fromarray(square).save(tmp_path / "big.png")
    common = ["--n", "4", "--steps", "2", "--no-progress", "--npz", "--seed", "1"]
    assert main(["sample", str(base), *common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main(["sample", str(base), "--controlnet", str(cn), "--control", str(tmp_path / "big.png"), *common,
                 "--out", str(tmp_path / "steered.png")]) == 0
    out = capsys.readouterr().out
    assert "note: --control" in out and "16x16 pixels; scaled and center-cropped to 8x8" in out
    plain, steered = (np.load(tmp_path / f"{n}.npz")["samples"] for n in ("plain", "steered"))
    assert np.abs(plain - steered).max() > 1e-3  # the trained ControlNet changes what is drawn
    other = tmp_path / "other"
    assert main(["train", *TINY_DIGITS, "train.steps=1", "unet.base_channels=8", f"train.out_dir={tmp_path}",
                 "train.name=other"]) == 0
    capsys.readouterr()
    for argv, message in (
        (["sample", str(base), "--control", "c.png"], "no --controlnet is given"),
        (["sample", str(base), "--controlnet", str(cn)], "one --control picture per --controlnet"),
        (["sample", str(cn)], "is a ControlNet (of "),
        (["sample", str(other), "--controlnet", str(cn), "--control", str(tmp_path / "big.png")],
         "its tensor encoder.time_embed.0.weight has shape (64, 16), the base's time_embed.0.weight (32, 8)"),
        (["train-controlnet", str(base), "unet.base_channels=8"], "unet.base_channels cannot change"),
    ):
        assert main([*argv, "--no-progress"] if argv[0] == "sample" else argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
