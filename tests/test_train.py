"""The trainer: it learns, and a resumed run is bit-identical to an uninterrupted one."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import STRAIGHT_STEPS, TINY_DIGITS
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.data import make_toy
from ddpmlab.io.checkpoint import latest_checkpoint, load_model
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.data import StepBatchSampler

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "log.csv")))
    return [float(r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cfg = load_config("toy2d", [f"train.out_dir={root}", "train.name=roll", "train.steps=1500",
                                "train.sample_n=500", "train.sample_steps=100", "train.sample_sampler=ddim",
                                "train.log_every=50"])
    return train(cfg, progress=False)


def test_training_lowers_the_loss(toy_run):
    losses = _losses(toy_run)
    assert losses[-1] < 0.6 * losses[0], losses


def test_toy_samples_lie_on_the_swiss_roll(toy_run):
    from ddpmlab.diffusion.schedules import NoiseSchedule
    from ddpmlab.samplers.generate import generate

    cfg, model = load_model(toy_run)
    x = generate(model, NoiseSchedule.from_config(cfg.diffusion), (2,), 1000, sampler="ddpm", steps=1000,
                 clip_x0=None, progress=False)
    data = make_toy("swiss_roll", 20000, seed=123)
    dist = torch.cdist(x, data).min(1).values
    # the roll is a thin curve: trained samples sit on it, Gaussian noise of the same spread does not
    noise = torch.randn(1000, 2) * data.std(0)
    base = torch.cdist(noise, data).min(1).values
    assert dist.median() < 0.05 < base.median(), (dist.median(), base.median())
    assert (dist < 0.15).float().mean() > 0.9
    assert x.std(0).sub(data.std(0)).abs().max() < 0.15  # covers the whole roll, not one arm


def test_step_batches_depend_only_on_the_step():
    full = list(StepBatchSampler(100, 32, 0, 10, seed=3))
    tail = list(StepBatchSampler(100, 32, 6, 10, seed=3))
    assert full[6:] == tail
    shards = [list(StepBatchSampler(100, 32, 0, 10, seed=3, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == full
    epoch = [i for b in full[:3] for i in b]  # 3 batches of 32 from one permutation: no repeats
    assert len(set(epoch)) == 96


def _ddpm(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread, as straight_run
    p = subprocess.run([sys.executable, "-m", "ddpmlab", *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_resume_in_a_fresh_process_is_bit_identical(straight_run, tmp_path, one_thread):
    # stopped half-way in this process, resumed to the end in a fresh one: equal to the straight run
    half = STRAIGHT_STEPS // 2
    assert main(["train", *TINY_DIGITS, f"train.steps={half}", f"train.out_dir={tmp_path}",
                 "train.name=stopped"]) == 0
    first = load_file(tmp_path / f"stopped/checkpoints/step_{half:07d}/model.safetensors")
    _ddpm("train", "--resume", "stopped", f"train.steps={STRAIGHT_STEPS}", "--no-progress", cwd=tmp_path)
    end = f"checkpoints/step_{STRAIGHT_STEPS:07d}"
    a, b = straight_run / end, tmp_path / "stopped" / end
    for name in ("model", "ema", "optimizer"):
        wa, wb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k} differs after resume"
    # the model did change, and the EMA is not just a copy of it
    last, ema = load_file(b / "model.safetensors"), load_file(b / "ema.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert any(not torch.equal(ema[k], last[k]) for k in last)
    assert _losses(straight_run) == _losses(tmp_path / "stopped")


def test_damaged_newest_checkpoint_falls_back_to_the_previous(straight_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(straight_run, run)  # checkpoints every 4 steps
    (run / "checkpoints/step_0000024/model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        path, ckpt = latest_checkpoint(run)
    assert path.name == "step_0000020" and ckpt["step"] == 20
