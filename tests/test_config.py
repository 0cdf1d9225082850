"""Config files and overrides: defaults are the paper's, bad input is refused by name."""

import pytest

from ddpmlab.config import Config, load_config
from ddpmlab.errors import ConfigError


def test_defaults_are_the_papers_values():
    c = Config()
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == \
        ("linear", 1000, 1e-4, 0.02)
    assert (c.model.base_channels, c.model.channel_mults, c.model.num_res_blocks) == (128, [1, 2, 2, 2], 2)
    assert (c.model.attention_resolutions, c.model.dropout) == ([16], 0.1)
    assert (c.train.lr, c.train.batch_size, c.train.ema_decay, c.train.grad_clip) == (2e-4, 128, 0.9999, 1.0)


@pytest.mark.parametrize("name", ["mnist", "toy2d", "cifar10"])
def test_bundled_configs_load(name):
    cfg = load_config(name)
    assert cfg.version == 1


def test_overrides_parse_yaml_values():
    cfg = load_config("mnist", ["train.steps=10", "model.channel_mults=[1,2]", "train.lr=3e-4",
                                "model.num_classes=null"])
    assert cfg.train.steps == 10 and cfg.model.channel_mults == [1, 2] and cfg.train.lr == 3e-4
    assert cfg.model.num_classes is None


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'; did you mean 'train.steps'"):
        load_config("mnist", ["train.stpes=10"])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  base_channel: 64\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'model\.base_channel'; did you mean 'model\.base_channels'"):
        load_config(str(f))


def test_unknown_section_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config section 'trian'; did you mean 'train'"):
        load_config(str(f))


@pytest.mark.parametrize("override,message", [
    ("train.steps=abc", "'train.steps' must be an integer"),
    ("train.batch_size=-4", "'train.batch_size' must be > 0"),
    ("diffusion.schedule=cosin", "'diffusion.schedule' is 'cosin'; choose one of"),
    ("diffusion.beta_end=0.00001", "beta_start < diffusion.beta_end"),
    ("data.channels=2", "'data.channels' must be 1, 3 or 4"),
    ("train.sample_steps=5000", "exceeds diffusion.num_timesteps"),
    ("version=2", "config version 2 is not supported"),
    ("train.steps", "must look like key=value"),
])
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mnist", [override])


def test_missing_config_file_lists_bundled_names():
    with pytest.raises(ConfigError, match="bundled configs: cifar10, mnist, toy2d"):
        load_config("does/not/exist.yaml")
