"""Bad config and command-line input: one clear error naming the key (and the file), before training."""

import pytest
import yaml

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.errors import ConfigError
from ddpmlab.models import build_model


@pytest.mark.parametrize("override,message", [
    ("train.adam_betas=[a,0.9]", "'train.adam_betas' must be two numbers in [0, 1)"),
    ("unet.attention_resolutions=[a]", "'unet.attention_resolutions' must be a list of positive integers"),
    ("unet.channel_mults=abc", "'unet.channel_mults' must be a list, got 'abc'"),
    ("data.image_size=[-8,8]", "'data.image_size' must be [H, W] with positive integers"),
    ("unet.base_channels=-3", "'unet.base_channels' must be > 0, got -3"),
    ("train.steps=true", "'train.steps' must be an integer, got True"),
    ("train.batch_size=1.5", "'train.batch_size' must be an integer"),
    ("train.lr=fast", "'train.lr' must be a number, got 'fast'"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' must be > 0"),
    ("train.max_bad_steps=-1", "'train.max_bad_steps' must be > 0"),
    ("version=2", "written by a newer ddpmlab; upgrade ddpmlab"),
    ("version=0", "written by an older ddpmlab"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("mnist", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("train:\n  lr: fast\n", "'train.lr' must be a number"),
    ("diffusion:\n  beta_start: 0.5\n  beta_end: 0.1\n", "beta_start < diffusion.beta_end"),
    ("version: 7\ntrain:\n  steps: 3\n", "'version': config version 7"),
])
def test_bad_config_file_names_the_file_and_the_key(tmp_path, text, message):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert str(e.value).startswith(f"{f}") and message in str(e.value)


def test_image_size_not_divisible_by_the_unet_downsampling_names_both_keys():
    cfg = load_config("mnist", ["data.dataset=folder", "data.path=x", "data.image_size=[30,30]",
                                "unet.channel_mults=[1,2,2]"])
    with pytest.raises(ConfigError, match=r"data.image_size=\[30, 30\] does not fit unet.channel_mults=\[1, 2, 2\]"):
        build_model(cfg)


def test_more_classes_in_the_data_than_the_model_has(tmp_path, capsys):
    rc = main(["train", "data.dataset=digits", "model.num_classes=3", f"train.out_dir={tmp_path}", "train.steps=1",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.num_classes (3)" in err and "10 classes" in err and len(err.splitlines()) == 1


def test_unknown_sample_sampler_fails_before_training(tmp_path, capsys):
    rc = main(["train", "data.dataset=digits", "train.sample_sampler=ddmi", f"train.out_dir={tmp_path}",
               "train.name=r", "--no-progress"])
    assert rc == 2 and "unknown sampler 'ddmi'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was trained or written


def test_resuming_a_run_written_by_a_newer_version_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("mnist").to_dict()
    cfg["version"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run}/config.yaml: 'version': config version 2" in err and "upgrade ddpmlab" in err


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  steps: 3\n  lr: a: b\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert str(e.value) == f"{f}: line 3, column 8: mapping values are not allowed here"


@pytest.mark.parametrize("override,message", [
    ("train.lr=[", "command line: train.lr=[: line 1, column 11: expected the node content, but found '<stream end>'"),
    ("data.path=@x", "command line: data.path=@x: line 1, column 11: found character '@' that cannot start any token"),
])
def test_an_override_that_is_not_yaml_names_the_item_and_column(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("mnist", [override])
    assert str(e.value) == message
