"""train.minutes: the steps that fit a wall-clock budget, fixed once from the measured speed."""

import pytest
import yaml

from ddpmlab.config import load_config
from ddpmlab.errors import ConfigError
from ddpmlab.training import budget as budget_mod
from ddpmlab.training.budget import PROBE_END, PROBE_START, SAFETY, Budget, fit_steps
from ddpmlab.training.tasks.diffusion import train


def test_fit_steps_pays_the_rest_of_the_budget_in_steps_within_its_limits():
    # 600 s budget, 30 s spent, 0.5 s per step, 60 s of final samples, 40 steps done
    assert fit_steps(600, 30, 0.5, 60, 40, 10_000) == 40 + int((SAFETY * 600 - 30 - 60) / 0.5)
    assert fit_steps(600, 30, 0.5, 60, 40, 500) == 500  # never above train.steps
    assert fit_steps(60, 50, 0.5, 60, 40, 500) == 40  # the budget is spent: stop where it is
    # samples every 100 steps cost a drawing each: 1000 s left at 1 s per step, 50 s per drawing
    total = fit_steps(1000 / SAFETY, 0, 1.0, 50, 0, 10_000, sample_every=100)
    drawings = lambda n: 1 + (n - 1) // 100  # noqa: E731 (the final one and one at 100, 200, ...)
    assert total + 50 * drawings(total) <= 1000 < (total + 1) + 50 * drawings(total + 1)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_budget_measures_the_probe_steps_then_refits_as_the_speed_changes(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(budget_mod.time, "time", clock)
    b = Budget(minutes=10, start_time=clock.now - 20, start_step=0, refit_every=25)  # set-up took 20 s
    fits = {}
    for done in range(1, 200):
        clock.now += 0.25 if done <= 100 else 0.75  # 0.25 s per step, then three times slower
        f = b.step_done(done, lambda: 30.0, 5000)
        if f is not None:
            fits[done] = f
    assert sorted(fits) == list(range(PROBE_END, 200, 25))  # at the probe's end, then every 25 steps
    elapsed = 20 + 0.25 * PROBE_END
    assert fits[PROBE_END] == PROBE_END + int((SAFETY * 600 - elapsed - 30) / 0.25)
    # at step 190: the mean step time since PROBE_START is (90 x 0.25 + 90 x 0.75) / 180 s
    step_s = (90 * 0.25 + 90 * 0.75) / (190 - PROBE_START)
    assert b.step_s == pytest.approx(step_s)
    elapsed = 20 + 100 * 0.25 + 90 * 0.75
    assert fits[190] == 190 + int((SAFETY * 600 - elapsed - 30) / step_s)
    assert fits[190] < fits[PROBE_END]  # the slow-down shortened the run
    assert Budget(minutes=10, start_time=0, start_step=PROBE_START).active is False  # a resumed run keeps its steps
    assert Budget(minutes=None, start_time=0, start_step=0).active is False


def _toy(tmp_path, minutes, steps=300):
    return load_config("toy2d", [f"train.out_dir={tmp_path}", "train.name=r", f"train.steps={steps}",
                                 f"train.minutes={minutes}", "train.sample_n=64", "train.sample_steps=20",
                                 "train.save_every=1000", "mlp.hidden=32", "mlp.num_layers=2"])


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
