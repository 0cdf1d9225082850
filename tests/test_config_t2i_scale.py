"""The GPU text-to-image config (text_to_image_512): Stable Diffusion 1.x's UNet built on the meta device with
diffusers' parameter count, its settings, the text checks of config validation, and the one rule for relative
paths of a config (the working directory)."""

import json

import pytest
import torch

from ddpmlab.config import BUNDLED_DIR, load_config
from ddpmlab.data import data_shape
from ddpmlab.errors import ConfigError
from ddpmlab.models import build_model, count_parameters
from ddpmlab.models.text import build_text_encoder

diffusers = pytest.importorskip("diffusers")

CONFIG = "text_to_image_512"
# Stable Diffusion 1.5's unet/config.json (the keys that size it): 859,520,964 parameters
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_PARAMS = 859_520_964

pytestmark = pytest.mark.usefixtures("one_thread")


def _sd_vae(path):
    """A stand-in for Stable Diffusion's VAE folder: a diffusers AutoencoderKL of the same f = 8 and 4 latent
    channels (tiny widths), written by diffusers."""
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, latent_channels=4,
                            norm_num_groups=4, scaling_factor=0.18215).save_pretrained(path)
    return path


def _count_on_meta(make) -> int:
    with torch.device("meta"):  # no memory: the 860M parameters are shapes only
        model = make()
    assert all(p.is_meta for p in model.parameters())
    return count_parameters(model)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return _sd_vae(tmp_path_factory.mktemp("sd") / "vae")


@pytest.mark.parametrize("size", [[], ["data.image_size=[256,256]", "unet.attention_resolutions=[32,16,8]"]],
                         ids=["512px", "256px"])
def test_the_bundled_512_config_builds_sd15s_unet_with_diffusers_parameter_count_on_meta(vae, size):
    from ddpmlab.io.diffusers_bridge import unet2d_condition_config

    cfg = load_config(CONFIG, [f"model.autoencoder={vae}", *size])
    assert data_shape(cfg) == (4, cfg.data.image_size[0] // 8, cfg.data.image_size[1] // 8)  # SD-VAE latents
    ours = _count_on_meta(lambda: build_model(cfg))
    theirs = _count_on_meta(lambda: diffusers.UNet2DConditionModel(**unet2d_condition_config(cfg)))
    sd15 = _count_on_meta(lambda: diffusers.UNet2DConditionModel(**SD15_UNET))
    assert ours == theirs == sd15 == SD15_PARAMS


def test_the_512_config_is_a_gpu_text_run_on_shards(vae):
    cfg = load_config(CONFIG, [f"model.autoencoder={vae}"])
    assert (BUNDLED_DIR.parent.parent / "configs" / f"{CONFIG}.yaml").read_bytes() == \
        (BUNDLED_DIR / f"{CONFIG}.yaml").read_bytes()  # configs/ mirrors ddpmlab/configs/
    assert cfg.data.dataset == "webdataset" and cfg.data.image_size == [512, 512]
    assert cfg.train.mixed_precision == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.text.encoder not in (None, "own") and cfg.text.max_length == 77  # a frozen CLIP folder
    assert cfg.unet.context_dim == 768 and cfg.unet.pooled_dim is None  # CLIP ViT-L/14's tokens, as SD 1.x
    with torch.device("meta"):
        assert build_model(cfg).gradient_checkpointing


# ------------------------------------------------------------------------------ validation

OWN = ["data.dataset=folder", "data.path=x", "text.encoder=own", "text.width=64", "text.heads=4"]


@pytest.mark.parametrize("overrides, needles", [
    (["unet.context_dim=32"], ["unet.context_dim=32", "tokens 64 wide", "text.width=64", "set unet.context_dim=64"]),
    (["unet.context_dim=64", "unet.pooled_dim=48"],
     ["unet.pooled_dim=48", "pooled embedding 64 wide", "set unet.pooled_dim=64"]),
    (["model.kind=dit", "dit.preset=DiT-S/2", "dit.context_dim=128"],
     ["dit.context_dim=128", "tokens 64 wide", "set dit.context_dim=64"]),
    (["model.kind=dit", "dit.depth=2", "dit.hidden=96", "dit.heads=5", "dit.patch_size=2", "dit.context_dim=64"],
     ["dit.heads=5 does not divide dit.hidden=96", "choose dit.heads among"]),
], ids=["unet-context", "unet-pooled", "dit-context", "dit-heads"])
def test_a_text_runs_widths_that_do_not_fit_are_one_line_naming_both_numbers(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, OWN + overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_matching_own_widths_and_a_frozen_encoder_of_any_width_validate():
    load_config(None, OWN + ["unet.context_dim=64", "unet.pooled_dim=64"])
    load_config(None, OWN + ["unet.context_dim=64"])  # tokens only: no pooled embedding
    load_config(None, OWN + ["model.kind=dit", "dit.preset=DiT-S/2", "dit.context_dim=64"])
    # a frozen encoder's widths live in its folder: checked when it is read, not by the config
    load_config(None, OWN + ["text.encoder=models/clip", "unet.context_dim=768"])


# ------------------------------------------------------------------------------ relative paths

def test_relative_autoencoder_and_text_encoder_paths_are_read_from_the_working_directory(tmp_path, monkeypatch):
    """One rule, as data.path's: a relative path in a config file is read from where ddpm runs, not from the
    config file's folder."""
    work, elsewhere = tmp_path / "work", tmp_path / "configs"
    work.mkdir()
    elsewhere.mkdir()
    _sd_vae(work / "vae")
    (work / "enc").mkdir()  # a folder that is found (and refused: not a text encoder) only from the working dir
    (work / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    config = elsewhere / "run.yaml"
    config.write_text("data: {dataset: folder, path: pictures, image_size: [64, 64]}\n"
                      "model: {autoencoder: vae}\ntext: {encoder: enc}\nunet: {context_dim: 32}\n")
    monkeypatch.chdir(work)
    cfg = load_config(str(config))
    assert cfg.model.autoencoder == "vae" and data_shape(cfg) == (4, 8, 8)  # the working directory's vae/
    with pytest.raises(ConfigError, match=r"text.encoder 'enc' holds a BertModel, not a text encoder"):
        build_text_encoder(cfg.text)
    monkeypatch.chdir(elsewhere)  # beside the config file: neither folder is there
    with pytest.raises(ConfigError, match=r"model.autoencoder 'vae' does not exist"):
        data_shape(cfg)
    with pytest.raises(ConfigError, match=r"text.encoder 'enc' does not exist"):
        build_text_encoder(cfg.text)
