"""Checkpoints survive a kill at any point of a save, order by training step however many, and sampling
reads only the weights it needs."""

import os

import pytest
import torch

from ddpmlab.config import load_config, save_config
from ddpmlab.io.checkpoint import (
    CONFIG_FILE,
    find_checkpoint,
    list_checkpoints,
    newest_weights,
    save_checkpoint,
)

OPT = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4)}},
       "param_groups": [{"lr": 1e-3, "params": [0]}]}


def _w(value: float) -> dict:
    return {"w": torch.full((4,), value)}


def test_a_save_of_the_same_step_killed_between_its_renames_keeps_that_step(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 4, _w(1.0), _w(1.0), OPT)
    save_checkpoint(tmp_path, 8, _w(2.0), _w(2.0), OPT)  # step 8, to be saved again after a resume
    real_replace = os.replace

    def killed_before_the_new_version_lands(src, dst):
        if str(src).endswith(".step_0000008.tmp"):
            raise KeyboardInterrupt  # SIGINT/SIGKILL between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_version_lands)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 8, _w(3.0), _w(3.0), OPT)
    monkeypatch.setattr(os, "replace", real_replace)
    path, ckpt, skipped = find_checkpoint(tmp_path)  # what a resume or `ddpm sample` finds now
    assert ckpt["step"] == 8 and torch.equal(ckpt["ema"]["w"], _w(2.0)["w"]) and not skipped
    save_checkpoint(tmp_path, 9, _w(4.0), _w(4.0), OPT)  # the next save puts step 8 back in its place
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000009", "step_0000008", "step_0000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")) == []


def test_checkpoints_order_by_training_step_past_ten_million(tmp_path):
    for step in (9_999_998, 9_999_999, 10_000_000):
        save_checkpoint(tmp_path, step, _w(step), _w(step), OPT, keep=3)
    # step 9,999,999 is older than step 10,000,000 (its name sorts after it as text)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_10000000", "step_9999999", "step_9999998"]
    assert find_checkpoint(tmp_path)[1]["step"] == 10_000_000


def test_sampling_reads_the_weights_only(tmp_path):
    cfg = load_config("toy2d")
    save_config(cfg, tmp_path / CONFIG_FILE)
    save_checkpoint(tmp_path, 4, _w(1.0), _w(5.0), OPT)
    (tmp_path / "checkpoints" / "step_0000004" / "optimizer.safetensors").write_bytes(b"torn")  # not needed
    path, ema = newest_weights(tmp_path, "ema")
    assert path.name == "step_0000004" and torch.equal(ema["w"], _w(5.0)["w"])
    path, ckpt, skipped = find_checkpoint(tmp_path)  # a resume needs the optimizer: damaged for it
    assert path is None and [p.name for p, _ in skipped] == ["step_0000004"]
