"""Every kind of training runs on the one loop: distillation and the autoencoder get what diffusion training
has (the lock taken before the run folder is touched, a checkpoint on SIGTERM, bit-exact resume, the
non-finite guard), and the loop's log keeps an older release's rows under its new header."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distill import SCHED, TEACHER, cfg_for, data, mlp

from ddpmlab.config import load_config
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import find_checkpoint
from ddpmlab.training.lock import RunLock
from ddpmlab.training.run_folder import RunLog
from ddpmlab.training.tasks.autoencoder import train_autoencoder
from ddpmlab.training.tasks.distill import distill

KEYS = dict(method="consistency", steps=1, iterations=[16], batch_size=32, n_start=4, n_end=8)


def _same_checkpoints(a: Path, b: Path) -> None:
    _, ca, _ = find_checkpoint(a)
    _, cb, _ = find_checkpoint(b)
    assert ca["step"] == cb["step"]
    for part in ("model", "ema"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    for k in ca["weights"]["extra"]:  # the target network
        assert torch.equal(ca["weights"]["extra"][k], cb["weights"]["extra"][k])


def test_distillation_saves_on_sigterm_and_resumes_bit_identically(tmp_path, one_thread, capsys):
    cfg = cfg_for(**KEYS)
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, tmp_path / "straight", progress=False, write_samples=False)
    calls = []

    def terminated_at_the_sixth_step(n, gen):
        calls.append(n)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, in the middle of a training step
        return data(n, gen)

    run = tmp_path / "stopped"
    distill(cfg, TEACHER, "eps", mlp(), SCHED, terminated_at_the_sixth_step, run, progress=False, write_samples=False)
    assert "received SIGTERM: saved checkpoint at step 6" in capsys.readouterr().out
    assert find_checkpoint(run)[1]["step"] == 6
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, run, resume=True, progress=False, write_samples=False)
    _same_checkpoints(tmp_path / "straight", run)


def test_a_nonfinite_distillation_step_never_reaches_the_student(tmp_path, one_thread, capsys):
    cfg = cfg_for(**KEYS)

    def nan_at_step_3(n, gen):
        x, y = data(n, gen)
        return (x * float("nan"), y) if gen.initial_seed() % 1_000_003 == 2 else (x, y)

    distill(cfg, TEACHER, "eps", mlp(), SCHED, nan_at_step_3, tmp_path / "r", progress=False, write_samples=False,
            stop_after=3)
    assert "step 3: non-finite loss or gradient" in capsys.readouterr().out
    _, ckpt, _ = find_checkpoint(tmp_path / "r")
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values())
    rows = (tmp_path / "r" / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,round,lr,grad_norm,it_per_s,time_s,skipped"


def _events(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in (run / "tensorboard").glob("*")}


def test_a_second_distill_resume_on_a_live_run_is_refused_before_it_touches_the_folder(tmp_path, one_thread):
    cfg = cfg_for(**KEYS)
    cfg.train.tensorboard = True
    cfg.train.log_every = 2
    run = tmp_path / "live"
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, run, progress=False, write_samples=False, stop_after=8)
    # the live run has logged past its checkpoint (a resume would trim these rows and purge these events)
    with (run / "log.csv").open("a") as f:
        f.write("10,0.5,0,0.001,1.0,1.0,1.0,0\n")
    log, events = (run / "log.csv").read_bytes(), _events(run)
    assert events
    with RunLock(run):  # this live process trains the run
        with pytest.raises(DDPMError, match="is in use by another"):
            distill(cfg, TEACHER, "eps", mlp(), SCHED, data, run, resume=True, progress=False, write_samples=False)
    assert (run / "log.csv").read_bytes() == log and _events(run) == events


def test_a_second_autoencoder_resume_on_a_live_run_is_refused_before_it_touches_the_folder(tmp_path, one_thread,
                                                                                           monkeypatch):
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path / "cache"))
    cfg = load_config("mnist_autoencoder", [
        "data.dataset=digits", "autoencoder.block_out_channels=[8,8]", "autoencoder.norm_groups=4",
        "autoencoder.latent_channels=2", "autoencoder.stats_n=16", "train.batch_size=8", "train.steps=4",
        "train.save_every=2", "train.log_every=1", "train.device=cpu", "train.tensorboard=true",
        f"train.out_dir={tmp_path}", "train.name=ae", "train.minutes=null"])
    run = train_autoencoder(cfg, progress=False)
    with (run / "log.csv").open("a") as f:
        f.write("5,1,1,1,0,0,0.001,1,1,1,0\n")
    log, events = (run / "log.csv").read_bytes(), _events(run)
    with RunLock(run):
        with pytest.raises(DDPMError, match="is in use by another"):
            train_autoencoder(cfg, run_dir=run, resume=True, progress=False)
    assert (run / "log.csv").read_bytes() == log and _events(run) == events


def test_a_log_of_other_columns_is_kept_under_the_new_header(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,round,loss,lr,it_per_s,time_s\n2,0,0.5,0.001,3.0,1.0\n")  # an older release's columns
    with RunLog(path, ["step", "loss", "round", "lr", "grad_norm", "it_per_s", "time_s", "skipped"]) as log:
        log.row([4, "0.4", 1, "0.001", "2.0", "3.5", "2.0", 0])
    assert path.read_text().splitlines() == ["step,loss,round,lr,grad_norm,it_per_s,time_s,skipped",
                                             "2,0.5,0,0.001,,3.0,1.0,", "4,0.4,1,0.001,2.0,3.5,2.0,0"]


def test_a_run_on_class_folders_knows_its_classes_by_name(tmp_path, one_thread, capsys):
    from PIL import Image

    from ddpmlab.cli import main

    for k, name in enumerate(["circle", "square"]):  # two classes of flat 8x8 pictures
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 60 * k + 10 * i).save(tmp_path / "data" / name / f"{i}.png")
    assert main(["train", "--config", "mnist", "data.dataset=folder", f"data.path={tmp_path / 'data'}",
                 "data.image_size=8", "data.channels=1", "model.num_classes=2", "unet.base_channels=8",
                 "unet.norm_groups=4", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.steps=2",
                 "train.minutes=null", "train.batch_size=4", "train.sample_n=2", "train.sample_steps=2",
                 "train.device=cpu", "train.tensorboard=false", f"train.out_dir={tmp_path}", "train.name=r",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "classes.json").read_text()) == {"class_names": ["circle", "square"]}
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "r"), "--class", "list"]) == 0
    assert "square" in capsys.readouterr().out
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", str(tmp_path / "r"), "--class", "square", "--n", "2", "--npz", "--out", str(a)]) == 0
    assert main(["sample", str(tmp_path / "r"), "--class", "1", "--n", "2", "--npz", "--out", str(b)]) == 0
    with np.load(a.with_suffix(".npz")) as x, np.load(b.with_suffix(".npz")) as y:
        assert np.array_equal(x["samples"], y["samples"])  # the name is the index it stands for


def test_the_development_pages_task_example_trains_and_converges(tmp_path, one_thread, monkeypatch):
    import re

    page = (Path(__file__).parents[1] / "docs" / "development.md").read_text()
    code = re.search(r"A toy task.*?```python\n(.*?)```", page, re.S).group(1).replace("/tmp/tasks", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/development.md", "exec"), scope)
    _, ckpt, _ = find_checkpoint(tmp_path / "mean")
    assert ckpt["step"] == 200 and abs(float(ckpt["model"]["weight"]) - 3.0) < 1e-3
    rows = (tmp_path / "mean" / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,it_per_s,time_s,skipped" and float(rows[-1].split(",")[1]) < 1e-6
