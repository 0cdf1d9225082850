"""train.minutes: the steps that fit a wall-clock budget, fixed once from the measured speed."""

import pytest
import yaml

from ddpmlab.config import load_config
from ddpmlab.errors import ConfigError
from ddpmlab.training import budget as budget_mod
from ddpmlab.training.budget import PROBE_END, PROBE_START, SAFETY, Budget, fit_steps
from ddpmlab.training.loop import train


def test_fit_steps_pays_the_rest_of_the_budget_in_steps_within_its_limits():
    # 600 s budget, 30 s spent, 0.5 s per step, 60 s of final samples, 40 steps done
    assert fit_steps(600, 30, 0.5, 60, 40, 10_000) == 40 + int((SAFETY * 600 - 30 - 60) / 0.5)
    assert fit_steps(600, 30, 0.5, 60, 40, 500) == 500  # never above train.steps
    assert fit_steps(60, 50, 0.5, 60, 40, 500) == 40  # the budget is spent: stop where it is


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_budget_measures_the_probe_steps_and_fits_once(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(budget_mod.time, "time", clock)
    b = Budget(minutes=10, start_time=clock.now - 20, start_step=0)  # set-up took 20 s
    fitted = []
    for done in range(1, 100):
        clock.now += 0.25  # 0.25 s per step
        fitted.append(b.step_done(done, lambda: 30.0, 5000))
    got = [(done, f) for done, f in enumerate(fitted, start=1) if f is not None]
    elapsed = 20 + 0.25 * PROBE_END
    assert got == [(PROBE_END, PROBE_END + int((SAFETY * 600 - elapsed - 30) / 0.25))]
    assert b.step_s == pytest.approx(0.25) and b.sampling_s == 30.0
    assert Budget(minutes=10, start_time=0, start_step=PROBE_START).active is False  # a resumed run keeps its steps
    assert Budget(minutes=None, start_time=0, start_step=0).active is False


def _toy(tmp_path, minutes, steps=300):
    return load_config("toy2d", [f"train.out_dir={tmp_path}", "train.name=r", f"train.steps={steps}",
                                 f"train.minutes={minutes}", "train.sample_n=64", "train.sample_steps=20",
                                 "train.save_every=1000", "model.hidden=32", "model.num_layers=2"])


def test_a_spent_budget_stops_at_the_probe_and_the_run_records_the_fitted_steps(tmp_path, capsys):
    run = train(_toy(tmp_path, 0.001), progress=False)  # 0.06 s: spent before the probe ends
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["steps"] == PROBE_END and config["train"]["minutes"] == 0.001
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{PROBE_END:07d}"]
    assert f"{PROBE_END} of at most 300 steps fit" in capsys.readouterr().out


def test_an_ample_budget_keeps_train_steps(tmp_path):
    run = train(_toy(tmp_path, 1e4, steps=60), progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 60
    assert (run / "checkpoints" / "step_0000060").is_dir()


def test_bad_minutes_are_refused():
    for bad in ("0", "-1", "true"):
        with pytest.raises(ConfigError, match="train.minutes"):
            load_config("toy2d", [f"train.minutes={bad}"])
