"""The DiT denoiser (Peebles & Xie 2023): the paper's sizes, adaLN-Zero, checkpointing, the CLI, diffusers."""

import numpy as np
import pytest
import torch
from _util import perturb
from PIL import Image

from ddpmlab.cli import main
from ddpmlab.config import DIT_PRESETS, dit_settings, load_config, save_config
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.checkpoint import CONFIG_FILE, save_checkpoint
from ddpmlab.models import UNet, build_model, count_parameters
from ddpmlab.models.dit import DiT, DiTBlock
from ddpmlab.models.transformer import sincos_2d
from ddpmlab.runs import load_run
from ddpmlab.samplers.guidance import guided

pytestmark = pytest.mark.usefixtures("one_thread")

# Parameters of the paper's models (facebookresearch/DiT models.py: frozen pos_embed included) on
# 256x256 ImageNet as 32x32x4 latents, 1000 classes + the "no label" row, learned sigma (8 output channels).
# Derived by hand from that structure, per block 18 d^2 + 15 d (qkv 3d^2+3d, proj d^2+d, MLP 8d^2+5d,
# adaLN 6d^2+6d); plus patch conv, time MLP (256 -> d -> d), 1001 x d labels, T x d positions, final layer.
# Table 4 of the paper rounds them: S/2 33M, B/2 130M, L/2 458M, XL/2 675M.
PAPER_COUNTS = {
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
}
TINY = dict(in_channels=1, image_size=8, patch_size=2, hidden=32, depth=2, num_heads=4)
TINY_KEYS = ["model.kind=dit", "dit.depth=2", "dit.hidden=32", "dit.heads=4", "dit.patch_size=2"]


def test_the_12_presets_have_the_parameter_counts_of_the_papers_code():
    assert list(DIT_PRESETS) == list(PAPER_COUNTS)
    for name, expected in PAPER_COUNTS.items():
        with torch.device("meta"):  # shapes only: XL/2 would take 2.7 GB
            model = DiT.from_preset(name, in_channels=4, out_channels=8, image_size=32, num_classes=1000)
        assert count_parameters(model) == expected, name


def test_config_preset_builds_dit_xl_2_from_model_preset(tmp_path):
    cfg = load_config(None, ["data.dataset=folder", "data.path=unused", "data.image_size=[32,32]", "data.channels=4",
                             "model.kind=dit", "dit.preset=DiT-XL/2", "model.num_classes=1000",
                             "diffusion.variance=learned_range", "diffusion.loss_type=hybrid"])
    assert dit_settings(cfg.dit) == {"depth": 28, "hidden": 1152, "heads": 16, "patch_size": 2}
    save_config(cfg, tmp_path / "config.yaml")  # a run's saved config keeps the preset and reloads
    again = load_config(str(tmp_path / "config.yaml"))
    assert (again.model, again.dit) == (cfg.model, cfg.dit)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, DiT) and count_parameters(model) == 675_129_632 and model.out_channels == 8


def test_position_embedding_is_the_2d_sincos_of_the_paper():
    """Token (i, j) of a 2 x 3 grid: [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k / (d / 4))."""
    d = 8
    emb = sincos_2d(d, 2, 3).double()
    w = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for i in range(2):
        for j in range(3):
            ref = torch.cat([torch.sin(j * w), torch.cos(j * w), torch.sin(i * w), torch.cos(i * w)])
            torch.testing.assert_close(emb[i * 3 + j], ref, atol=1e-7, rtol=0)


def test_adaln_zero_blocks_are_the_identity_and_the_model_outputs_zero_at_init():
    torch.manual_seed(0)
    block, x, c = DiTBlock(32, 4), torch.randn(3, 16, 32) * 5, torch.randn(3, 32)
    assert torch.equal(block(x, c), x)
    model = DiT(**TINY, num_classes=5)
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 1, 8, 8) and torch.count_nonzero(out) == 0
    perturb(block)  # the identity comes from the zero gates, not from the block's structure
    assert not torch.allclose(block(x, c), x)


def test_learned_sigma_doubles_the_output_channels():
    cfg = load_config(None, ["data.dataset=digits", *TINY_KEYS, "diffusion.variance=learned_range",
                             "diffusion.loss_type=hybrid"])
    model = perturb(build_model(cfg))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]))
    assert isinstance(model, DiT) and out.shape == (2, 2, 8, 8)


def test_class_labels_condition_and_the_null_label_is_the_unconditional_model():
    model = perturb(DiT(**TINY, num_classes=3)).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 10, 900, 900])
    with torch.no_grad():
        uncond = model(x, t)
        torch.testing.assert_close(uncond, model(x, t, torch.full((4,), 3)), atol=0, rtol=0)
        a, b = model(x, t, torch.tensor([0, 0, 0, 0])), model(x, t, torch.tensor([2, 2, 2, 2]))
        assert (a - b).abs().max() > 1e-3
        cfg_out = guided(model, torch.tensor([0, 0, 0, 0]), scale=3.0)(x, t)  # Ho & Salimans 2022, Eq. 6
        torch.testing.assert_close(cfg_out, uncond + 3.0 * (a - uncond), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        DiT(**TINY)(x, t, torch.zeros(4, dtype=torch.long))


def _grads(model, x, t, y):
    model.zero_grad()
    (model(x, t, y) ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    if kind == "dit":
        model = perturb(DiT(**TINY, num_classes=3))
        first = model.blocks[0]
    else:
        model = perturb(UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,),
                             norm_groups=4, dropout=0.1, num_classes=3, image_size=8))
        first = model.down[0].res[0]
    model.train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 1, 2, 3])
    calls, forward = [], first.forward

    def counted(*args):
        calls.append(1)
        return forward(*args)

    first.forward = counted
    torch.manual_seed(1)  # the same dropout masks in both passes (checkpointing replays the RNG state)
    plain = _grads(model, x, t, y)
    assert len(calls) == 1
    model.gradient_checkpointing = True
    torch.manual_seed(1)
    recomputed = _grads(model, x, t, y)
    assert len(calls) == 3  # forward, then recomputed in the backward pass
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=0, rtol=0, msg=name)


def test_tiny_dit_overfits_a_fixed_batch():
    """eps-prediction loss on one fixed (x0, t, noise) batch: 100 AdamW steps take it far below its start."""
    torch.manual_seed(0)
    model = DiT(**TINY, num_classes=2)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    t, noise, y = torch.randint(0, 1000, (8,)), torch.randn(8, 1, 8, 8), torch.arange(8) % 2
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # Ho et al. 2020, Eq. 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = ((model(x_t, t, y) - noise) ** 2).mean()  # L_simple, Eq. 14
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert 0.8 < losses[0] < 1.2  # the output starts at 0: the loss is E[eps^2] = 1
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("overrides, needles", [
    (["model.kind=dit", "dit.preset=dit-xl/2"], ["dit-xl/2", "did you mean 'DiT-XL/2'", "DiT-S/2", "DiT-XL/8"]),
    (["model.kind=dit"], ["dit.preset", "dit.depth", "dit.patch_size"]),
    (["dit.preset=DiT-S/2"], ["dit.preset", "model.kind=dit"]),
    (["model.kind=dit", "dit.preset=DiT-S/2", "dit.depth=4"], ["dit.depth=12", "dit.depth=4"]),
    ([*TINY_KEYS[:3], "dit.heads=3", "dit.patch_size=2"], ["dit.heads=3", "dit.hidden=32"]),
])
def test_bad_dit_keys_are_one_line_errors_naming_them(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.dataset=digits", *overrides])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and all(n in msg for n in needles), msg


def test_a_patch_that_does_not_divide_the_image_is_refused_naming_size_patch_and_fix():
    cfg = load_config("mnist", ["model.kind=dit", "dit.preset=DiT-S/8"])
    with pytest.raises(ConfigError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "28x28" in msg and "dit.patch_size=8" in msg
    assert "e.g. 2, 4, 7, 14" in msg and "data.image_size=[32, 32]" in msg


def test_ddpm_train_and_sample_a_tiny_dit(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["train", "--config", "mnist", "data.dataset=digits", f"train.out_dir={root}", "train.name=dit",
                 "--no-progress", *TINY_KEYS, "model.num_classes=10", "train.label_dropout=0.1", "train.steps=20",
                 "train.batch_size=16", "train.sample_n=4", "train.sample_steps=2", "train.log_every=5",
                 "model.gradient_checkpointing=true"]) == 0
    run = root / "dit"
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[-1].startswith("20,")
    loaded = load_run(run, device="cpu")
    assert isinstance(loaded.model, DiT) and len(loaded.model.blocks) == 2 and loaded.model.num_classes == 10
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--steps", "10", "--out", str(out), "--npz", "--class", "3",
                 "--guidance", "2"]) == 0
    samples = np.load(out.with_suffix(".npz"))["samples"]
    assert samples.shape == (4, 1, 8, 8) and np.abs(samples).max() <= 1.0 and np.abs(samples).max() > 0
    assert Image.open(out).size[0] > 8


# ---------------------------------------------------------------- diffusers

def _fake_dit_run(tmp_path, overrides):
    cfg = load_config(None, ["data.dataset=folder", "data.path=unused", "data.image_size=[8,8]", "data.channels=3",
                             *TINY_KEYS, *overrides])
    model = perturb(build_model(cfg), seed=0, scale=0.1)
    model.pos_embed.data.copy_(sincos_2d(32, 4, 4))  # fixed, never trained: diffusers recomputes it
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / CONFIG_FILE)
    sd = model.state_dict()
    save_checkpoint(run, 1, sd, sd, torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    return run, cfg, model.eval()


@pytest.mark.parametrize("overrides", [
    ["model.num_classes=3", "diffusion.variance=learned_range", "diffusion.loss_type=hybrid"],
    ["diffusion.prediction=v", "diffusion.schedule=cosine"],
], ids=["classes-learned-sigma", "unconditional-v"])
def test_exported_dit_transformer_equals_ours_to_1e5(tmp_path, overrides):
    diffusers = pytest.importorskip("diffusers")
    from ddpmlab.io.diffusers_bridge import export_diffusers

    run, cfg, ours = _fake_dit_run(tmp_path, overrides)
    out = export_diffusers(run, tmp_path / "exported")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(out / "scheduler"))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 417, 999])
    k = cfg.model.num_classes
    y = torch.tensor([0, 2, 3]) if k else None  # 3: the "no label" row
    with torch.no_grad():
        a = ours(x, t, y)
        b = theirs(x, timestep=t, class_labels=y if k else torch.zeros(3, dtype=torch.long)).sample
    assert a.abs().max() > 0.1  # perturbed weights: a real function, not zeros
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert scheduler.config.variance_type == cfg.diffusion.variance
    assert scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[cfg.diffusion.prediction]


def test_dit_export_refuses_what_diffusers_cannot_express(tmp_path):
    pytest.importorskip("diffusers")
    from ddpmlab.io.diffusers_bridge import export_diffusers
    from ddpmlab.io.diffusers_dit import dit_transformer_config

    run, cfg, model = _fake_dit_run(tmp_path, ["dit.mlp_ratio=2.0"])
    with pytest.raises(DDPMError, match=r"dit\.mlp_ratio=2\.0"):
        export_diffusers(run, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    cfg.dit.mlp_ratio = 4.0
    with pytest.raises(DDPMError, match="position embedding"):  # e.g. a weights file that changed it
        dit_transformer_config(cfg, perturb(build_model(cfg)))
