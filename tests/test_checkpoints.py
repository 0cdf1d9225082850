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


def test_a_torn_log_row_costs_its_own_values_not_the_loss_column(tmp_path):
    from ddpmlab.viz.plots import plot_loss, read_log_columns

    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,loss,lr,grad_norm,it_per_s,time_s,skipped\n"
                                 "10,0.9,0.001,1.5,3.0,1.0,0\n20,0.7,0.001,1.2,3.0,2.0,0\n"
                                 "30,0.5x,0.0\n"  # a row torn by a kill mid-write
                                 "40,0.4,0.001,1.1,3.0,4.0,0\n")
    cols = read_log_columns(run / "log.csv")
    assert cols["step"].tolist() == [10, 20, 30, 40] and cols["loss"][[0, 1, 3]].tolist() == [0.9, 0.7, 0.4]
    assert "grad_norm" in cols and "lr" in cols  # every column is kept
    assert plot_loss([run], tmp_path / "loss.png").is_file()


def test_the_evaluation_log_survives_a_torn_row_and_a_kill_mid_trim(tmp_path, monkeypatch):
    from ddpmlab.evaluate.log import read_eval_log, trim_eval_log

    path = tmp_path / "eval.csv"
    path.write_text("step,fid\n100,3.5\n200,2.5\n30")  # the last row torn by a kill
    assert read_eval_log(tmp_path)["fid"].tolist() == [3.5, 2.5]
    before = path.read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)  # the kill lands just before the trimmed log replaces the old
    with pytest.raises(KeyboardInterrupt):
        trim_eval_log(tmp_path, 150)
    assert path.read_text() == before  # the old log, whole
    monkeypatch.undo()
    trim_eval_log(tmp_path, 150)
    assert read_eval_log(tmp_path)["step"].tolist() == [100.0]


def test_a_latent_cache_entry_of_another_size_is_recomputed_and_a_killed_write_keeps_the_old(tmp_path, monkeypatch):
    from ddpmlab.data.latents import cached_latents

    calls = []

    def encode(n):
        def encode_all():
            calls.append(n)
            return torch.randn(n, 2, 2, 2), torch.zeros(n, dtype=torch.int64)
        return encode_all

    cache = tmp_path / "latents" / "key.safetensors"
    z, y, hit = cached_latents(cache, encode(5), count=5)
    assert not hit and cached_latents(cache, encode(5), count=5)[2]  # read back
    z2, _, hit = cached_latents(cache, encode(6), count=6)  # the data changed size: the entry does not fit
    assert not hit and len(z2) == 6 and calls == [5, 6]
    before = cache.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cached_latents(cache, encode(7), count=7)
    assert cache.read_bytes() == before and sorted(p.name for p in cache.parent.iterdir()) == ["key.safetensors"]


@pytest.mark.parametrize("kill_at", ["write", "fsync", "replace", "dir_fsync"])
def test_a_kill_at_any_write_point_leaves_the_old_file_or_the_new_one_whole(tmp_path, monkeypatch, kill_at):
    import ddpmlab.atomic as atomic

    path = tmp_path / "autoencoder.json"
    atomic.atomic_write_text(path, '{"scale_factor": 1.0}')

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"write": (atomic.Path, "write_text"), "fsync": (atomic.os, "fsync"),
              "replace": (atomic.os, "replace"), "dir_fsync": (atomic, "fsync_dir")}[kill_at]
    monkeypatch.setattr(*target, killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_text(path, '{"scale_factor": 2.0}')
    monkeypatch.undo()
    assert path.read_text() in ('{"scale_factor": 1.0}', '{"scale_factor": 2.0}')  # whole, old or new
    assert [p.name for p in tmp_path.iterdir()] == ["autoencoder.json"]  # no temporary file left behind


def test_a_kill_while_taking_the_lock_leaves_no_lock_or_a_whole_one(tmp_path, monkeypatch):
    import json as json_

    from ddpmlab.training.lock import LOCK_FILE, RunLock

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", killed)  # killed after the content is written, before it becomes the lock
    with pytest.raises(KeyboardInterrupt):
        RunLock(tmp_path).acquire()
    monkeypatch.undo()
    assert not (tmp_path / LOCK_FILE).exists() and list(tmp_path.iterdir()) == []
    with RunLock(tmp_path):  # the next trainer takes the run
        assert json_.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
