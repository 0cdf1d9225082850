"""LoRA adapters (Hu et al. 2022) and fine-tuning from a run.

A fresh adapter leaves the network's output exactly as it was (B = 0); the merged weights W_0 + (alpha / r) B A
compute what the network with its adapters computes and equal peft's own merge_and_unload, and several adapters
combine as peft runs them together; `ddpm finetune` starts from the source's EMA weights, a LoRA run trains only
its adapters (the base stays bit-identical), writes them alone to RUN/adapter.safetensors and samples as its base
with that adapter does; LoRA and full fine-tuning resume bit for bit; adapters of another base or another kind
of model, and sources that are neither a run nor a diffusers folder, are refused in one line.
"""

import copy

import numpy as np
import pytest
import torch
from _util import TINY_DIGITS, one_line_error, perturb
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.io.adapters import ADAPTER_FILE, read_adapter, save_adapter
from ddpmlab.models.lora import adapter_state, add_lora, lora_targets, merge_adapter, merged_state
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.models.unet import UNet
from ddpmlab.training.tasks.finetune import finetune_run

peft = pytest.importorskip("peft")

STEPS = ["train.steps=6", "train.save_every=3", "train.lr=3e-3"]


def _unet(base=16):
    return perturb(UNet(in_channels=1, base_channels=base, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), norm_groups=8, num_classes=3, image_size=(8, 8)))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([3.0, 500.0]), torch.tensor([0, 3])


def _lora_cfg(*more):
    return load_config("mnist", ["finetune.method=lora", "lora.rank=3", "lora.alpha=6", *more])


def _randomise_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _checkpoint(run, step, part="model"):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


def _finetune(base, out, name, method, *more):
    return ["finetune", str(base), "--method", method, *STEPS, f"train.out_dir={out}", f"train.name={name}",
            "--no-progress", *more]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny class-conditional digit run trained 4 steps, and its 6-step LoRA fine-tuning (one thread)."""
    root = tmp_path_factory.mktemp("lora")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY_DIGITS, "train.steps=4", f"train.out_dir={root}", "train.name=base"]) == 0
        assert main(_finetune(root / "base", root, "lora", "lora")) == 0
    finally:
        torch.set_num_threads(n)
    return root / "base", root / "lora"


# --- the adapters ------------------------------------------------------------------------------------------

def test_a_fresh_lora_leaves_the_outputs_identical():
    model = _unet().eval()
    x, t, y = _inputs()
    before = model(x, t, y)
    add_lora(model, _lora_cfg("lora.target_modules=[qkv,proj_out,conv1,conv2]"))
    state = model.state_dict()
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_A." in k)  # A drawn, B zero
    assert all(v.abs().sum() == 0 for k, v in state.items() if ".lora_B." in k)
    assert torch.equal(model(x, t, y), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # only the adapters train


def test_the_merged_model_is_base_plus_adapter_and_peft_merge_and_unload():
    base = _unet()
    targets = lora_targets(base, ["qkv", "proj_out", "conv1"])  # linear and 3x3 convolution layers
    adapted = _randomise_adapters(add_lora(copy.deepcopy(base), _lora_cfg("lora.target_modules=[qkv,proj_out,conv1]")))
    x, t, y = _inputs()
    merged = copy.deepcopy(base).eval()
    merged.load_state_dict(merged_state(adapted.state_dict(), 6 / 3))
    assert torch.allclose(merged(x, t, y), adapted(x, t, y), atol=1e-5)  # h = W_0 x + (alpha / r) B A x
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v for k, v in adapter_state(adapted).items()})
    theirs = theirs.merge_and_unload()
    for key, value in merged.state_dict().items():
        assert torch.allclose(value, theirs.state_dict()[key], atol=1e-6), key


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the second adapter, on purpose
def test_several_adapters_combine_as_peft_runs_them_together(tmp_path):
    base = _unet()
    targets = lora_targets(base, ["qkv", "conv2"])
    both = copy.deepcopy(base)
    for name, rank in (("a", 2), ("b", 4)):
        peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=3, target_modules=targets), both,
                                     adapter_name=name)
    _randomise_adapters(both)
    for layer in (m for m in both.modules() if isinstance(m, peft.tuners.lora.LoraLayer)):
        layer.set_adapter(["a", "b"])
        layer.set_scale("a", 0.5)
        layer.set_scale("b", -1.5)
    ours = copy.deepcopy(base).eval()
    for name, rank, scale in (("a", 2, 0.5), ("b", 4, -1.5)):
        state = peft.get_peft_model_state_dict(both, adapter_name=name)
        path = save_adapter(tmp_path / f"{name}.safetensors", state, rank, 3.0, ["qkv", "conv2"], "test")
        tensors, scaling = read_adapter(path)
        assert scaling == 3.0 / rank and tensors.keys() == state.keys()
        assert merge_adapter(ours, tensors, scale * scaling, name, "the test UNet") == len(targets)
    x, t, y = _inputs()
    assert torch.allclose(ours(x, t, y), both(x, t, y), atol=1e-5)


# --- fine-tuning runs --------------------------------------------------------------------------------------

def test_lora_and_full_finetuning_resume_bit_identically(runs, tmp_path, one_thread, capsys):
    base, lora = runs
    for method, straight in (("lora", lora), ("full", None)):
        if straight is None:
            assert main(_finetune(base, tmp_path, "straight", method)) == 0
            straight = tmp_path / "straight"
        args = _finetune(base, tmp_path, f"{method}-stopped", method)
        finetune_run(base, method, [a for a in args if "=" in a], progress=False, stop_after=3)
        stopped = tmp_path / f"{method}-stopped"
        assert (stopped / "checkpoints" / "step_0000003").is_dir() and not (stopped / ADAPTER_FILE).exists()
        capsys.readouterr()
        assert main(["finetune", "--resume", str(stopped), "--no-progress"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert any(line.startswith(f"resuming {stopped}") for line in out)
        if method == "lora":  # the closing line: the adapter's size against the full model's
            size = (stopped / ADAPTER_FILE).stat().st_size
            assert out[-1].startswith("adapter (EMA): ") and f"{size / 1e3:.1f} kB = " in out[-1], out[-1]
            full = sum(v.numel() * v.element_size() for v in _checkpoint(base, 4, "ema").values())
            assert f"{100 * size / full:.2f}% of the full model's {full / 1e6:.2f} MB" in out[-1], out[-1]
        for part in ("model", "ema", "optimizer"):
            a, b = _checkpoint(straight, 6, part), _checkpoint(stopped, 6, part)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (method, part)
    full = _checkpoint(tmp_path / "straight", 6)
    start = _checkpoint(base, 4, "ema")
    assert full.keys() == start.keys() and not torch.equal(full["conv_in.weight"], start["conv_in.weight"])


def test_a_lora_run_trains_only_its_adapters_and_saves_them_alone(runs):
    base, lora = runs
    start = _checkpoint(base, 4, "ema")  # the run starts from the base's EMA weights
    for part in ("model", "ema"):
        state = _checkpoint(lora, 6, part)
        plain = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
        assert plain.keys() == start.keys() and all(torch.equal(plain[k], start[k]) for k in start), part
        assert all(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k), part  # B, zero at first, trained
    ema = _checkpoint(lora, 6, "ema")
    adapter = load_file(str(lora / ADAPTER_FILE))
    layers = {k.split(".lora_A.")[0] for k in ema if ".lora_A." in k}
    assert len(layers) == 8 and {k.rsplit(".", 3)[-3] for k in adapter} == {"qkv", "proj_out"}  # the default
    assert adapter.keys() == {f"{m}.lora_{p}.weight" for m in layers for p in "AB"}  # adapter tensors only
    assert all(torch.equal(v, ema[k.replace(".weight", ".default.weight")]) for k, v in adapter.items())
    full_bytes = sum(v.numel() * 4 for v in start.values())
    assert (lora / ADAPTER_FILE).stat().st_size < 0.05 * full_bytes
    log = (lora / "log.csv").read_text().splitlines()
    assert len(log) == 7  # header + a row per step


def test_a_lora_run_samples_as_its_base_with_its_adapter(runs, tmp_path, one_thread, capsys):
    base, lora = runs
    draw = ["--n", "4", "--sampler", "ddim", "--steps", "3", "--npz", "--no-progress"]

    def sample(*args):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        assert main(["sample", *args, *draw, "--out", f"{out}/"]) == 0
        return np.load(out / "samples.npz")["samples"]

    own, plain = sample(str(lora)), sample(str(base))
    assert np.array_equal(own, sample(str(base), "--lora", str(lora / ADAPTER_FILE)))
    assert np.array_equal(own, sample(str(base), "--lora", str(lora)))  # the run folder names its adapter
    assert np.array_equal(plain, sample(str(base), "--lora", f"{lora / ADAPTER_FILE}:0"))  # scale 0: the base
    assert not np.array_equal(own, plain)
    assert "LoRA adapter" in capsys.readouterr().out


def test_finetuning_starts_from_the_weights_of_a_diffusers_folder(runs, tmp_path, one_thread, capsys):
    base, _ = runs
    folder = tmp_path / "diffusers"
    assert main(["export", str(base), str(folder)]) == 0  # a UNet2DModel folder of the base's EMA weights
    one_line_error(capsys, ["finetune", str(folder), "--no-progress"], "holds no training data", "data.path")
    tiny = [a for a in TINY_DIGITS if a.startswith(("data.", "train."))]
    assert main(["finetune", str(folder), *tiny, "train.steps=1", "train.lr=0", f"train.out_dir={tmp_path}",
                 "train.name=tuned", "--no-progress"]) == 0  # at learning rate 0 the weights stay the source's
    start, tuned = _checkpoint(base, 4, "ema"), _checkpoint(tmp_path / "tuned", 1)
    assert tuned.keys() == start.keys() and all(torch.equal(tuned[k], start[k]) for k in start)


# --- bad input ---------------------------------------------------------------------------------------------



def test_adapters_and_sources_that_do_not_fit_are_refused_in_one_line(runs, tmp_path, capsys):
    base, lora = runs
    other = _randomise_adapters(add_lora(_unet(base=8), _lora_cfg()))  # another base: half the channels
    save_adapter(tmp_path / "other.safetensors", adapter_state(other), 3, 6, ["qkv"], "elsewhere")
    one_line_error(capsys, ["sample", str(base), "--lora", str(tmp_path / "other.safetensors")],
                    "another base model", "down.1.attn.0.proj_out.lora_A.weight is (3, 16)", "(3, 32)", "(32, 32)")
    mlp = add_lora(MLPDenoiser(), _lora_cfg("lora.target_modules=[fc1]"))
    save_adapter(tmp_path / "mlp.safetensors", adapter_state(mlp), 3, 6, ["fc1"], "toy")
    one_line_error(capsys, ["sample", str(base), "--lora", str(tmp_path / "mlp.safetensors")],
                    "other module names", "fc1")
    one_line_error(capsys, ["sample", str(base), "--lora", str(lora / "checkpoints" / "step_0000006" /
                                                                "ema.safetensors")], "not a LoRA adapter")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["finetune", str(tmp_path / "empty")], "has no config.yaml", "diffusers")
    one_line_error(capsys, _finetune(base, tmp_path, "x", "lora", "lora.target_modules=[qkv,nope]"),
                    "'nope' names no Linear or Conv2d layer", "conv1")
    one_line_error(capsys, _finetune(base, tmp_path, "y", "lora", "lora.target_modules=[conv]"),
                    "upsampling convolution")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any run folder
    one_line_error(capsys, _finetune(base, tmp_path, "z", "full", "lora.rank=8"), "lora.rank cannot change")
    one_line_error(capsys, _finetune(base, tmp_path, "w", "full", "unet.base_channels=8"), "train.*, data.*")
    one_line_error(capsys, ["train", "--resume", str(lora), "--no-progress"], "ddpm finetune --resume")
    one_line_error(capsys, ["export", str(lora), str(tmp_path / "out")], "add --merge")
