"""User-supplied weights load only from safetensors or torch.load(weights_only=True):
a pickle crafted to run code on load is refused, and its code never runs."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import load_weights
from ddpmlab.io.weights import load_state_dict_file
from ddpmlab.training.tasks.diffusion import train


class _CreatesFile:
    """Unpickling this calls open(target, 'w'): a real payload that leaves a file behind."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil_torch_file(path, target):
    torch.save({"weight": torch.zeros(3), "bias": _CreatesFile(target)}, path)
    return path


def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    """Control: with an unrestricted unpickler both payload files do create their file."""
    a, b = tmp_path / "created_by_torch_load", tmp_path / "created_by_pickle_load"
    torch.load(_evil_torch_file(tmp_path / "x.pt", a), weights_only=False)
    (tmp_path / "x.pkl").write_bytes(pickle.dumps({"w": _CreatesFile(b)}))
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert a.exists() and b.exists()


@pytest.mark.parametrize("kind", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_its_code_does_not_run(tmp_path, kind):
    canary = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    if kind == "torch.save":
        _evil_torch_file(path, canary)
    else:
        path.write_bytes(pickle.dumps({"weight": _CreatesFile(canary)}))
    with pytest.raises(DDPMError, match=r"refused to load .*weights\.pt.*pickle") as e:
        load_state_dict_file(path)
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)
    if kind == "torch.save":
        assert "open" in str(e.value)  # names the callable the file asked for
    assert not canary.exists()


def test_a_torch_whose_weights_only_load_can_be_bypassed_reads_no_pytorch_file(tmp_path, monkeypatch):
    import ddpmlab.io.weights as weights

    assert weights.torch_loads_safely("2.6.0") and weights.torch_loads_safely("2.13.0+cpu")
    assert not weights.torch_loads_safely("2.5.1") and not weights.torch_loads_safely("1.13.1")
    path = tmp_path / "w.pt"
    torch.save({"weight": torch.ones(2)}, path)
    monkeypatch.setattr(weights.torch, "__version__", "2.5.1")  # CVE-2025-32434: weights_only is no guard
    with pytest.raises(DDPMError, match=r"refused to load .*w\.pt.*torch 2\.5\.1.*CVE-2025-32434.*safetensors"):
        weights.load_state_dict_file(path)
    save_file({"weight": torch.ones(2)}, str(tmp_path / "w.safetensors"))  # safetensors never unpickles
    assert torch.equal(weights.load_state_dict_file(tmp_path / "w.safetensors")["weight"], torch.ones(2))


def test_the_package_requires_a_torch_that_loads_weights_safely():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    low = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert low and (int(low.group(1)), int(low.group(2))) >= (2, 6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    cfg = load_config("mnist", ["data.dataset=digits", "data.split=test", "unet.base_channels=8",
                                "unet.norm_groups=4", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]",
                                "train.batch_size=8", "train.steps=2", "train.sample_n=2", "train.sample_steps=2",
                                f"train.out_dir={root}", "train.name=r"])
    return train(cfg, progress=False)


def _sample(run, tmp_path, name, *extra):
    out = tmp_path / f"{name}.png"
    rc = main(["sample", str(run), "--n", "3", "--steps", "2", "--out", str(out), "--npz", "--device", "cpu", *extra])
    return rc, out.with_suffix(".npz")


def test_sample_with_weights_file_matches_the_runs_own_weights(tiny_run, tmp_path):
    ema = load_weights(tiny_run, "ema")
    save_file(ema, str(tmp_path / "ema.safetensors"))
    torch.save({"state_dict": ema}, tmp_path / "ema.pt")  # a plain tensor dict: allowed by weights_only
    rc, ref = _sample(tiny_run, tmp_path, "ref")
    assert rc == 0
    for f in ("ema.safetensors", "ema.pt"):
        rc, got = _sample(tiny_run, tmp_path, f, "--weights-file", str(tmp_path / f))
        assert rc == 0
        assert np.array_equal(np.load(ref)["samples"], np.load(got)["samples"])


def test_sample_refuses_a_malicious_weights_file(tiny_run, tmp_path, capsys):
    canary = tmp_path / "pwned"
    evil = _evil_torch_file(tmp_path / "model.bin", canary)
    rc, out = _sample(tiny_run, tmp_path, "evil", "--weights-file", str(evil))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "refused to load" in err and "model.bin" in err and len(err.splitlines()) == 1
    assert not canary.exists() and not out.exists()


def test_weights_file_that_does_not_fit_the_model_is_named(tiny_run, tmp_path, capsys):
    save_file({"nonsense": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    rc, _ = _sample(tiny_run, tmp_path, "a", "--weights-file", str(tmp_path / "other.safetensors"))
    assert rc == 2 and "does not fit the model" in capsys.readouterr().err
    rc, _ = _sample(tiny_run, tmp_path, "b", "--weights-file", str(tmp_path / "broken.safetensors"))
    assert rc == 2 and "not a valid safetensors file" in capsys.readouterr().err


def _unpickling_in_full(monkeypatch):
    """diffusers as older releases (and any on torch < 2.6) read a .bin: torch.load that runs what it finds."""
    import diffusers.models.modeling_utils as modeling_utils

    original = modeling_utils.load_state_dict

    def load_state_dict(checkpoint_file, *args, **kwargs):
        if str(checkpoint_file).endswith(".safetensors"):
            return original(checkpoint_file, *args, **kwargs)
        return torch.load(checkpoint_file, map_location="cpu", weights_only=False)

    monkeypatch.setattr(modeling_utils, "load_state_dict", load_state_dict)


@pytest.mark.parametrize("kind", ["UNet2DModel", "AutoencoderKL"])
def test_a_diffusers_folder_with_only_a_pickled_bin_is_refused_and_its_payload_never_runs(tmp_path, monkeypatch, kind):
    diffusers = pytest.importorskip("diffusers")
    from ddpmlab.io.diffusers_bridge import load_diffusers_model
    from ddpmlab.models.autoencoder import load_diffusers_vae

    folder, canary = tmp_path / "model", tmp_path / "pwned"
    if kind == "UNet2DModel":
        model = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                                      up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
        diffusers.DDPMScheduler().save_pretrained(str(folder))  # flat, as google/ddpm-cifar10-32
    else:
        model = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                        latent_channels=2, norm_num_groups=4)
    model.save_pretrained(str(folder))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    _evil_torch_file(folder / "diffusion_pytorch_model.bin", canary)
    _unpickling_in_full(monkeypatch)
    load = load_diffusers_model if kind == "UNet2DModel" else load_diffusers_vae
    with pytest.raises(DDPMError, match=r"holds only diffusion_pytorch_model\.bin, a pickle.*safetensors only") as e:
        load(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    assert not canary.exists()
    model.save_pretrained(str(folder))  # the same folder with safetensors weights loads (the .bin is not read)
    assert load(folder) is not None and not canary.exists()
