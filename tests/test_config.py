"""Config files and overrides: defaults are the paper's, bad input is refused by name."""

import copy
import dataclasses

import pytest
import yaml

from ddpmlab.config import (
    SECTIONS,
    Config,
    config_from_dict,
    describe_config,
    dit_settings,
    format_config,
    load_config,
    save_config,
    validate,
)
from ddpmlab.errors import ConfigError


def test_defaults_are_the_papers_values():
    c = Config()
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == \
        ("linear", 1000, 1e-4, 0.02)
    assert (c.unet.base_channels, c.unet.channel_mults, c.unet.num_res_blocks) == (128, [1, 2, 2, 2], 2)
    assert (c.unet.attention_resolutions, c.unet.dropout) == ([16], 0.1)
    assert (c.train.lr, c.train.batch_size, c.train.ema_decay, c.train.grad_clip) == (2e-4, 128, 0.9999, 1.0)


BUNDLED = {  # a few keys of each bundled config, as the files state them
    "mnist": {"data.dataset": "mnist", "unet.base_channels": 32, "unet.channel_mults": [1, 2, 2],
              "train.steps": 3000, "train.minutes": 9.5, "diffusion.process": "flow",
              "diffusion.prediction": "velocity", "diffusion.min_snr_gamma": None,
              "train.sample_sampler": "dpmpp_2m_sde",
              "train.mixed_precision": "auto", "model.num_classes": 10, "train.sample_guidance": 2.0,
              "train.sample_steps": 20},
    "mnist_ddpm": {"diffusion.process": "ddpm", "diffusion.prediction": "eps", "diffusion.min_snr_gamma": 5.0,
                   "unet.base_channels": 32, "train.sample_sampler": "dpmpp_2m_sde", "train.sample_guidance": 2.0},
    "toy2d": {"data.dataset": "toy", "model.kind": "mlp", "mlp.hidden": 128, "train.steps": 3000,
              "train.sample_steps": 1000, "diffusion.variance": "fixed_large"},
    "toy2d_learned": {"model.kind": "mlp", "diffusion.variance": "learned_range", "diffusion.loss_type": "hybrid",
                      "diffusion.vlb_weight": 0.001, "train.sample_steps": 50},
    "cifar10": {"data.dataset": "folder", "data.path": "data/cifar10/train", "unet.base_channels": 128,
                "train.steps": 800000, "train.lr": 2e-4},
}


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_configs_load_to_their_values(name):
    cfg = load_config(name)
    got = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in BUNDLED[name]}
    assert got == BUNDLED[name]


# the config.yaml of a run directory written by a version-1 ddpmlab (abridged: unnamed keys default)
SAVED_RUN_CONFIG = """\
data:
  dataset: toy
  toy: moons
model:
  kind: mlp
  hidden: 64
diffusion:
  schedule: cosine
  num_timesteps: 200
train:
  steps: 10
  sample_steps: 20
  mixed_precision: 'no'
version: 1
"""


def test_a_run_config_saved_as_version_1_still_loads(tmp_path):
    """Old run directories must keep resuming: bumping CONFIG_VERSION without reading version 1 fails here."""
    f = tmp_path / "config.yaml"
    f.write_text(SAVED_RUN_CONFIG)
    cfg = load_config(str(f))
    assert (cfg.version, cfg.data.toy, cfg.mlp.hidden, cfg.diffusion.schedule, cfg.train.sample_steps) == \
        (1, "moons", 64, "cosine", 20)


def test_a_config_file_older_than_version_1_is_refused(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text(SAVED_RUN_CONFIG.replace("version: 1", "version: 0"))
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert str(e.value).startswith(f"{f}: 'version': config version 0 is not supported")
    assert "written by an older ddpmlab" in str(e.value)


def test_describe_config_lists_every_key_with_type_and_default():
    text = describe_config()
    rows = {line.split()[0]: line.split() for line in text.splitlines()}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(Config(), section)):
            assert f"{section}.{f.name}" in rows
    assert set(rows) == {f"{s}.{f.name}" for s in SECTIONS
                         for f in dataclasses.fields(getattr(Config(), s))} | {"version"}
    assert rows["train.steps"][:3] == ["train.steps", "int", "800000"]
    assert rows["model.num_classes"][:3] == ["model.num_classes", "int|null", "null"]
    assert rows["data.image_size"][1:4] == ["list", "[32,", "32]"]
    assert "linear | cosine" in text  # a field comment as the meaning


def test_describe_config_shows_the_values_of_a_given_config():
    rows = {line.split()[0]: line.split() for line in describe_config(load_config("mnist")).splitlines()}
    assert rows["train.steps"][:3] == ["train.steps", "int", "3000"]


@pytest.mark.parametrize("name", BUNDLED)
def test_format_config_round_trips(name):
    cfg = load_config(name, ["model.num_classes=null", "train.name='x: #y'", "train.lr=3e-4"]
                      if name == "mnist" else [])
    assert config_from_dict(yaml.safe_load(format_config(cfg))) == cfg


def test_overrides_parse_yaml_values():
    cfg = load_config("mnist", ["train.steps=10", "unet.channel_mults=[1,2]", "train.lr=3e-4",
                                "model.num_classes=null"])
    assert cfg.train.steps == 10 and cfg.unet.channel_mults == [1, 2] and cfg.train.lr == 3e-4
    assert cfg.model.num_classes is None


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'; did you mean 'train.steps'"):
        load_config("mnist", ["train.stpes=10"])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("unet:\n  base_channel: 64\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'unet\.base_channel'; did you mean 'unet\.base_channels'"):
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
    with pytest.raises(ConfigError, match="bundled configs: (.*, )?cifar10, (.*, )?mnist, (.*, )?toy2d"):
        load_config("does/not/exist.yaml")


def test_a_config_in_the_old_flat_model_spelling_loads_with_one_note(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    f.write_text("data:\n  dataset: digits\nmodel:\n  kind: unet\n  base_channels: 16\n  channel_mults: [1, 2]\n"
                 "  attention_resolutions: [4]\n  norm_groups: 8\n  num_classes: 10\n")
    cfg = load_config(str(f), ["model.dropout=0.2"])
    assert (cfg.unet.base_channels, cfg.unet.channel_mults, cfg.unet.norm_groups) == (16, [1, 2], 8)
    assert cfg.unet.dropout == 0.2 and cfg.model.num_classes == 10
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2  # one line for the file, one for the command line
    assert "model.base_channels -> unet.base_channels" in notes[0] and "model.norm_groups -> unet.norm_groups" in notes[0]
    assert "model.dropout -> unet.dropout" in notes[1]
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)  # written in the new spelling: it loads without a note
    assert load_config(str(saved)) == cfg and "note:" not in capsys.readouterr().err


def test_validate_never_changes_the_config():
    cfg = load_config("imagenet_dit", ["data.image_size=32", "data.path=x"])
    assert cfg.data.image_size == [32, 32]  # one number is a square, read so at load time
    before = copy.deepcopy(cfg)
    validate(cfg)
    assert cfg == before and cfg.dit.depth is None  # the preset's sizes are resolved where the DiT is built
    assert dit_settings(cfg.dit) == {"depth": 28, "hidden": 1152, "heads": 16, "patch_size": 2}
