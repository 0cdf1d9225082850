"""Denoiser networks: paper size, shapes, conditioning, config errors, equivalence with diffusers."""

import pytest
import torch
import yaml
from _util import perturb

from ddpmlab.config import BUNDLED_DIR, Config, load_config
from ddpmlab.errors import ConfigError
from ddpmlab.models import MLPDenoiser, UNet, build_model, count_parameters
from ddpmlab.models.autoencoder import build_autoencoder
from ddpmlab.models.fast_ops import FastDropout

TINY = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            dropout=0.0, norm_groups=8, image_size=(16, 16))
CIFAR10_DIFFUSERS_PARAMS = 35_746_307  # google/ddpm-cifar10-32 UNet2DModel


pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusers_unet(**kw):
    diffusers = pytest.importorskip("diffusers")
    base = dict(norm_eps=1e-6, downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, act_fn="silu",
                time_embedding_type="positional", mid_block_scale_factor=1, attention_head_dim=None)
    return diffusers.UNet2DModel(**{**base, **kw})


def test_cifar10_config_has_35_7M_parameters_equal_to_diffusers():
    n = count_parameters(UNet())  # defaults = the paper's CIFAR-10 model
    assert abs(n - 35.7e6) < 0.1e6
    assert n == CIFAR10_DIFFUSERS_PARAMS
    ref = _diffusers_unet(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                          layers_per_block=2, norm_num_groups=32)
    assert n == count_parameters(ref)


def _to_diffusers_state_dict(model: UNet) -> dict:
    """Our weights renamed to UNet2DModel's (the mapping lives in ddpmlab.io.diffusers_bridge)."""
    from ddpmlab.io.diffusers_bridge import to_diffusers_state_dict

    return to_diffusers_state_dict(model.state_dict())


@pytest.mark.parametrize("heads", [1, 2])
def test_forward_equals_diffusers_unet2dmodel_with_mapped_weights(heads):
    torch.manual_seed(0)
    mults = (1, 2) if heads == 1 else (1, 1)  # diffusers fixes the head width: equal widths for 2 heads
    ours = UNet(in_channels=3, base_channels=16, channel_mults=mults, num_res_blocks=1, attention_resolutions=(16,),
                dropout=0.0, num_heads=heads, norm_groups=8, num_classes=3, image_size=(16, 16)).eval()
    perturb(ours)
    ref = _diffusers_unet(sample_size=16, in_channels=3, out_channels=3, block_out_channels=tuple(16 * m for m in mults),
                          down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                          layers_per_block=1, norm_num_groups=8, num_class_embeds=4,
                          attention_head_dim=None if heads == 1 else 8).eval()
    ref.load_state_dict(_to_diffusers_state_dict(ours), strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, class_labels=y).sample, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_shape_matches_input_for_1_3_4_channels(channels):
    model = UNet(in_channels=channels, **TINY)
    out = model(torch.randn(2, channels, 16, 16), torch.tensor([1, 500]))
    assert out.shape == (2, channels, 16, 16)


def test_output_shape_for_non_square_input_and_out_channels():
    model = UNet(in_channels=3, out_channels=6, **{**TINY, "image_size": (16, 24)})
    assert model(torch.randn(2, 3, 16, 24), 10).shape == (2, 6, 16, 24)


def test_mnist_shape_with_three_levels():
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(14,), norm_groups=4, image_size=(28, 28))
    assert model(torch.randn(1, 1, 28, 28), torch.tensor([0.5])).shape == (1, 1, 28, 28)


def test_wrong_input_shape_raises_value_error():
    model = UNet(in_channels=3, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, 16, 16), 0)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 3, 15, 16), 0)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3))


def test_new_model_predicts_zero_because_output_layer_is_zero_initialised():
    model = UNet(in_channels=3, **TINY)
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16), 5)) == 0
    assert torch.count_nonzero(MLPDenoiser(hidden=32, num_layers=2)(torch.randn(4, 2), 5)) == 0


def test_time_embedding_changes_the_output_including_fractional_t():
    torch.manual_seed(0)
    model = perturb(UNet(in_channels=3, **TINY)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b, c = model(x, 10), model(x, 500), model(x, 10.5)
    assert not torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-6)


def test_class_embedding_changes_the_output_and_none_means_unconditional():
    torch.manual_seed(0)
    model = perturb(UNet(in_channels=3, num_classes=10, **TINY)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 100])
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
        uncond, null = model(x, t), model(x, t, torch.tensor([10, 10]))
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(uncond, null)
    with pytest.raises(ValueError, match="num_classes"):
        UNet(in_channels=3, **TINY)(x, t, torch.tensor([0, 1]))


def test_bad_norm_groups_raises_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"unet\.norm_groups.*48") as e:
        UNet(base_channels=48, channel_mults=(1, 2), norm_groups=32, image_size=(16, 16))
    assert "e.g. 24" in str(e.value)


def test_bad_image_size_raises_config_error_naming_the_keys():
    with pytest.raises(ConfigError, match=r"data\.image_size.*unet\.channel_mults.*multiples of 8"):
        UNet(base_channels=16, norm_groups=8, image_size=(28, 28))


def test_build_model_rejects_mnist_with_four_levels_but_accepts_three():
    cfg = Config()  # mnist with the paper's (1, 2, 2, 2)
    with pytest.raises(ConfigError, match=r"data\.image_size=\[28, 28\]"):
        build_model(cfg)
    cfg.unet.base_channels, cfg.unet.channel_mults, cfg.unet.norm_groups = 8, [1, 2, 2], 4
    cfg.unet.attention_resolutions = [14]  # the default [16] names no level of a 28-pixel UNet
    model = build_model(cfg, out_channels_multiplier=2)
    assert model.in_channels == 1 and model.out_channels == 2 and model.image_size == (28, 28)


def test_build_model_mlp_for_toy_data():
    cfg = Config()
    cfg.data.dataset, cfg.model.kind, cfg.mlp.hidden, cfg.mlp.num_layers = "toy", "mlp", 32, 2
    model = build_model(cfg)
    assert isinstance(model, MLPDenoiser)
    assert model(torch.randn(5, 2), torch.arange(5)).shape == (5, 2)


def test_batch_elements_are_independent_in_eval_mode():
    torch.manual_seed(0)
    model = perturb(UNet(in_channels=3, num_classes=4, **TINY)).eval()
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999]), torch.tensor([0, 4, 2])
    with torch.no_grad():
        batched = model(x, t, y)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_mlp_time_and_class_change_output_and_batch_independence():
    torch.manual_seed(0)
    model = perturb(MLPDenoiser(hidden=32, num_layers=2, time_embed_dim=16, num_classes=3, out_dim=4)).eval()
    x = torch.randn(3, 2)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
        assert out.shape == (3, 4)
        assert not torch.allclose(model(x, 1), model(x, 800), atol=1e-4)
        assert not torch.allclose(model(x, 1, torch.zeros(3, dtype=torch.long)), model(x, 1), atol=1e-4)
        single = torch.cat([model(x[i:i + 1], torch.tensor([i + 1]), torch.tensor([[0, 1, 3][i]])) for i in range(3)])
    torch.testing.assert_close(out, single)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.randn(3, 3), 0)


def test_bundled_cifar10_yaml_builds_the_papers_35_7M_model():
    n = count_parameters(build_model(load_config("cifar10")))
    assert n == CIFAR10_DIFFUSERS_PARAMS and abs(n - 35.7e6) < 0.1e6


def _vae_folder(path, channels: int, levels: int):
    """A small diffusers AutoencoderKL folder (f = 2^(levels - 1), 4 latent channels) written by diffusers."""
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels, latent_channels=4,
                  norm_num_groups=4).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml")))
def test_every_bundled_config_builds(name, tmp_path):
    raw = yaml.safe_load((BUNDLED_DIR / f"{name}.yaml").read_text())
    if raw.get("stage") == "autoencoder":
        a = load_config(name).autoencoder
        ae = build_autoencoder(1, a.block_out_channels, a.latent_channels, a.layers_per_block, a.norm_groups)
        assert count_parameters(ae) > 0
        return
    overrides = []
    data = raw.get("data", {})
    if data.get("dataset") in ("folder", "audio") and not data.get("path"):  # the config names the user's folder
        (tmp_path / "images").mkdir()
        overrides.append(f"data.path={tmp_path / 'images'}")
    if raw.get("model", {}).get("autoencoder"):  # latent configs: a stand-in autoencoder of the same f
        size = data.get("image_size", [28])[0]
        levels = 4 if size >= 64 else 3  # f = 8 (SD's VAE) for folders, 4 for the 28x28 digits
        overrides.append(f"model.autoencoder={_vae_folder(tmp_path / 'vae', data.get('channels', 1), levels)}")
    with torch.device("meta"):  # counts without memory (DiT-XL/2 has 675M parameters)
        assert count_parameters(build_model(load_config(name, overrides))) > 0


def test_attention_goes_to_the_levels_whose_feature_map_height_is_listed():
    model = UNet(in_channels=3, **{**TINY, "num_res_blocks": 2, "image_size": (16, 24)})  # heights 16, 8
    assert [len(level.attn) for level in model.down] == [0, 2]
    assert [len(level.attn) for level in model.up] == [3, 0]  # up[0] is the deepest level
    assert isinstance(model.down[0].res[0].dropout, FastDropout)


@pytest.mark.parametrize("resolutions, culprit", [((24,), "24 matches"), ((12, 8, 3), "12, 3 match")])
def test_attention_resolution_matching_no_level_raises_config_error_naming_the_levels(resolutions, culprit):
    # 32 x 24 images, three levels: heights 32, 16, 8 (24 and 12 are widths, not heights)
    with pytest.raises(ConfigError) as e:
        UNet(in_channels=3, **{**TINY, "channel_mults": (1, 2, 2), "image_size": (32, 24),
                                "attention_resolutions": resolutions})
    msg = str(e.value)
    assert msg.startswith(f"unet.attention_resolutions: {culprit} no level of the UNet") and "\n" not in msg
    assert "heights 32, 16, 8" in msg and "choose from those" in msg


def test_build_model_rejects_attention_resolutions_the_data_does_not_have():
    cfg = load_config("mnist", ["unet.attention_resolutions=[7,16]"])
    with pytest.raises(ConfigError, match=r"unet\.attention_resolutions: 16 matches no level.*heights 28, 14, 7"):
        build_model(cfg)
    cfg.unet.attention_resolutions = []
    assert isinstance(build_model(cfg), UNet)
