"""A run folder written by release 0.1 (tests/fixtures/release_0_1, made by that release's `ddpm train`:
a 4-step class-conditional run on the bundled digits, fp32, checkpoints at steps 2 and 4) still loads,
samples the images it sampled then from the same seed, and resumes to the weights it reached then."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpmlab.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_1"
EXPECTED = Path(__file__).parent / "fixtures" / "release_0_1_samples_seed3.npz"


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "release_0_1"
    shutil.copytree(FIXTURE, run)
    return run


def test_an_old_run_samples_what_it_sampled_then(old_run, tmp_path, one_thread):
    # no sampler options: the run's own sampler, steps and guidance, as release 0.1 drew them
    out = tmp_path / "s.png"
    assert main(["sample", str(old_run), "--n", "4", "--seed", "3", "--no-progress", "--npz", "--out", str(out),
                 "--device", "cpu"]) == 0
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as now, np.load(EXPECTED, allow_pickle=False) as then:
        assert now["samples"].shape == then["samples"].shape == (4, 1, 8, 8)
        np.testing.assert_allclose(now["samples"], then["samples"], atol=1e-4)


def test_an_old_run_resumes_to_the_weights_it_reached(old_run, one_thread):
    shutil.rmtree(old_run / "checkpoints" / "step_0000004")
    (old_run / "checkpoints" / "latest").write_text("step_0000002")
    assert main(["train", "--resume", str(old_run), "--no-progress", "train.device=cpu"]) == 0
    for part in ("model", "ema"):
        now = load_file(old_run / "checkpoints" / "step_0000004" / f"{part}.safetensors")
        then = load_file(FIXTURE / "checkpoints" / "step_0000004" / f"{part}.safetensors")
        assert now.keys() == then.keys()
        for k in then:  # the same arithmetic; another CPU's kernels may round the last bits differently
            torch.testing.assert_close(now[k], then[k], atol=1e-5, rtol=1e-4)
    rows = (old_run / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4"]
