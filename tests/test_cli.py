"""The command line: help texts, and bad input answered with one line that names the culprit."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ddpmlab.cli import build_parser, main
from ddpmlab.samplers.registry import SAMPLER_SPECS, STEP_SCHEDULES

TINY = ["train.steps=4", "train.batch_size=8", "unet.base_channels=8", "unet.norm_groups=4",
        "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.sample_n=4",
        "train.sample_steps=2", "train.log_every=2"]


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _commands(parser, prefix="ddpm"):
    """(name, parser) of every command and sub-command below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def test_every_option_of_every_command_has_a_help_text(capsys):
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in _commands(build_parser())
               for a in sub._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not a.help]
    assert missing == []
    for name, sub in _commands(build_parser()):
        with pytest.raises(SystemExit) as e:
            main([*name.split()[1:], "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {name}")


def test_sampling_help_names_every_sampler_and_step_schedule(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in SAMPLER_SPECS) and all(name in out for name in STEP_SCHEDULES)


def test_missing_data_folder(capsys, tmp_path):
    rc, err = _err(capsys, ["train", "data.dataset=folder", f"data.path={tmp_path / 'nope'}",
                            f"train.out_dir={tmp_path / 'runs'}", *TINY])
    assert rc == 2 and "nope" in err and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no (empty) run folder left


def test_folder_without_images(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    rc, err = _err(capsys, ["train", "data.dataset=folder", f"data.path={tmp_path / 'empty'}",
                            f"train.out_dir={tmp_path / 'runs'}", *TINY])
    assert rc == 2 and "empty" in err and "no image" in err.lower() and len(err.splitlines()) == 1


def test_unknown_config_key(capsys):
    rc, err = _err(capsys, ["train", "model.chanel_mults=[1,2]"])
    assert rc == 2 and "'model.chanel_mults'" in err and "did you mean 'unet.channel_mults'" in err


def test_resume_from_a_folder_that_is_not_a_run(capsys, tmp_path):
    rc, err = _err(capsys, ["train", "--resume", str(tmp_path)])
    assert rc == 2 and str(tmp_path) in err and "not a ddpmlab run" in err


def test_sample_from_a_folder_that_is_not_a_run(capsys, tmp_path):
    rc, err = _err(capsys, ["sample", str(tmp_path / "missing")])
    assert rc == 2 and "does not exist" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--config", "mnist", "data.dataset=digits", f"train.out_dir={root}", "train.name=r",
                 "--no-progress", *TINY]) == 0
    return root / "r"


def test_sample_with_an_unknown_sampler(capsys, tiny_run):
    rc, err = _err(capsys, ["sample", str(tiny_run), "--sampler", "ddmp"])
    assert rc == 2 and "unknown sampler 'ddmp'" in err and "ddpm" in err


def test_sample_steps_out_of_range(capsys, tiny_run):
    rc, err = _err(capsys, ["sample", str(tiny_run), "--steps", "0"])
    assert rc == 2 and "--steps must be between 1 and 1000" in err


def test_existing_run_is_never_overwritten(capsys, tiny_run):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    rc, err = _err(capsys, ["train", "--config", "mnist", "data.dataset=digits",
                            f"train.out_dir={tiny_run.parent}", "train.name=r", *TINY])
    assert rc == 2 and "already exists" in err and "--resume" in err
    assert before == {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}


def test_resume_refuses_an_architecture_change(capsys, tiny_run):
    rc, err = _err(capsys, ["train", "--resume", str(tiny_run), "unet.base_channels=16"])
    assert rc == 2 and "cannot change unet.base_channels" in err


def test_sample_writes_a_grid_and_npz(tiny_run, tmp_path):
    import numpy as np

    out = tmp_path / "grid.png"
    assert main(["sample", str(tiny_run), "--n", "6", "--steps", "3", "--out", str(out), "--npz"]) == 0
    assert Image.open(out).size[0] > 8
    samples = np.load(out.with_suffix(".npz"))["samples"]
    assert samples.shape == (6, 1, 8, 8) and np.abs(samples).max() <= 1.0


def test_errors_reach_the_shell_as_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "ddpmlab", "train", "--resume", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
