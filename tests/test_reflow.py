"""Reflow (Liu et al. 2023) and the straightness measure.

The straightness of the exact flow of a Gaussian has a closed form; reflow on an exact teacher (the
closed-form velocity of a Gaussian mixture) makes its paths straighter and its one-step samples land on the
data, where the teacher's one step lands on the data's mean; a class-conditional teacher's pairs keep their
labels; ``ddpm reflow`` on a tiny flow run starts from the teacher's EMA weights, resumes a crash in the pairs
without drawing them again (and a stop in training bit for bit), refuses what is no flow run, and its run
samples in one Euler step.
"""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.diffusion.analytic import ExactVelocity, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.straightness import straightness
from ddpmlab.evaluate.toy import sliced_wasserstein
from ddpmlab.io.checkpoint import save_run_config
from ddpmlab.runs import Run, load_run
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.training import pairs as pairs_module
from ddpmlab.training.pairs import chunk_path, draw_pairs, load_pairs, pair_plan
from ddpmlab.training.run_folder import resume_derived
from ddpmlab.training.tasks.reflow import reflow, reflow_run

FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity"]
TINY_MLP = ["mlp.hidden=32", "mlp.num_layers=2", "mlp.time_embed_dim=16"]
# three well separated components: the exact flow's paths bend towards them late, far from straight
MIX = GaussianMixture(torch.tensor([[-2.0, 1.0], [2.0, 1.0], [0.0, -2.0]]), 0.3)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _config(tmp_path, *overrides):
    return load_config("toy2d", [*FLOW, f"train.out_dir={tmp_path}", "train.tensorboard=false",
                                 "train.sample_n=100", "train.log_every=100", *overrides])


# --- the straightness measure ---------------------------------------------------------------------------

def test_straightness_of_the_exact_flow_of_a_gaussian_is_the_closed_form():
    # data N(mu, s^2 I): the ODE path from noise z is x_t = (1 - t) mu + g(t) z with g = sqrt((1 - t)^2 s^2 + t^2),
    # so (x_1 - x_0) - dx_t/dt = (1 - s - g'(t)) z and S = ||z||^2 int_0^1 (1 - s - g'(t))^2 dt
    mu, T = torch.tensor([1.0, -0.5], dtype=torch.float64), 1000
    schedule = NoiseSchedule.from_config(load_config("toy2d", FLOW).diffusion)
    z = _noise(500, 1)
    for s in (1.0, 0.3):
        predict = ModelPredictor(ExactVelocity(GaussianMixture(mu[None], s), T), schedule, "velocity")
        got, x0 = straightness(predict, schedule, z, 400)
        t = torch.linspace(0, 1, 200001, dtype=torch.float64)
        dg = ((1 + s**2) * t - s**2) / ((1 - t) ** 2 * s**2 + t**2).sqrt()
        integral = torch.trapezoid((1 - s - dg) ** 2, t).item()
        if s == 1.0:
            assert math.isclose(integral, 2 - math.pi / 2, rel_tol=1e-6)  # int_-1^1 u^2 / (1 + u^2) du
        ratio = got / z.pow(2).sum(1)
        assert torch.allclose(ratio, torch.full_like(ratio, integral), rtol=0.02), (s, ratio.mean(), integral)
        # the path is flow_euler's: it ends where flow_euler's samples do
        assert torch.allclose(x0, SAMPLERS["flow_euler"](predict, schedule, z, 400), atol=1e-12)
        assert torch.allclose(x0, mu + s * z, atol=0.03)  # and near the exact ODE solution (Euler: O(1/steps))


def test_a_constant_velocity_is_perfectly_straight():
    schedule = NoiseSchedule.from_config(load_config("toy2d", FLOW).diffusion)
    shift = torch.tensor([0.5, -2.0], dtype=torch.float64)
    predict = ModelPredictor(lambda x, t, y=None: shift.expand_as(x), schedule, "velocity")
    got, x0 = straightness(predict, schedule, _noise(100, 2), 30)
    assert got.abs().max() < 1e-9 and torch.allclose(x0, _noise(100, 2) - shift, atol=1e-12)


# --- reflow on an exact teacher ----------------------------------------------------------------------

def test_reflow_of_an_exact_teacher_straightens_its_paths_and_one_step_lands_on_the_data(tmp_path, one_thread):
    cfg = _config(tmp_path, *TINY_MLP, "mlp.hidden=64", "train.name=reflowed", "train.steps=400",
                  "train.lr=3e-3", "train.warmup_steps=50", "train.ema_start=200", "train.ema_decay=0.99",
                  "train.save_every=400", "train.mixed_precision=no", "train.sample_sampler=flow_euler",
                  "train.sample_steps=1", "reflow.pairs=4000", "reflow.chunk=2000", "reflow.sampler=flow_heun",
                  "reflow.steps=59")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    teacher = Run(cfg, ExactVelocity(MIX, schedule.num_timesteps), schedule, torch.device("cpu"))
    run_dir = reflow(cfg, teacher, tmp_path / "reflowed", progress=False)  # fresh weights: the teacher has none
    student = load_run(run_dir, device="cpu")
    z = _noise(2000, 3).float()
    data = MIX.sample(2000, torch.Generator().manual_seed(4)).float()
    gen = torch.Generator().manual_seed(5)
    measured = {}
    for name, model in (("teacher", teacher.model), ("reflowed", student.model)):
        predict = ModelPredictor(model, schedule, "velocity")
        s, _ = straightness(predict, schedule, z, 100)
        one = SAMPLERS["flow_euler"](predict, schedule, z, 1).float()
        measured[name] = (s.mean().item(), (torch.cov(one.T) - torch.cov(data.T)).abs().max().item(),
                          sliced_wasserstein(one, data, generator=gen))
    (s_t, cov_t, sw_t), (s_r, cov_r, sw_r) = measured["teacher"], measured["reflowed"]
    assert s_t > 1.0 and s_r < 0.1 * s_t, measured  # straighter paths
    # the teacher's one step lands every sample on the data's mean: covariance 0; the reflowed one's spread
    assert cov_t > 2.0 and cov_r < 0.2 * cov_t, measured
    assert sw_r < 0.3 * sw_t, measured


def test_a_class_conditional_teachers_pairs_keep_their_labels(tmp_path):
    # with its label, the exact teacher is component k alone, N(mu_k, s_k^2 I): its ODE carries z to mu_k + s_k z
    cfg = _config(tmp_path, "reflow.pairs=10", "reflow.chunk=4", "reflow.sampler=flow_heun", "reflow.steps=99")
    cfg.model.num_classes = 3  # 2-D points with classes: no data set has them, the exact teacher does
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    teacher = Run(cfg, ExactVelocity(MIX, schedule.num_timesteps), schedule, torch.device("cpu"))
    plan = pair_plan(teacher, cfg)
    assert draw_pairs(teacher, plan, cfg, tmp_path, progress=False) == 10
    pairs = load_pairs(cfg, plan, tmp_path, (2,))
    assert pairs.label.tolist() == [i % 3 for i in range(10)]
    want = MIX.means[pairs.label].float() + 0.3 * pairs.noise
    assert (pairs.sample - want).abs().max() < 2e-3
    assert draw_pairs(teacher, plan, cfg, tmp_path, progress=False) == 0  # all there: nothing drawn again


# --- ddpm reflow on a run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", "toy2d", *FLOW, *TINY_MLP, "train.steps=30", "train.ema_start=10",
                     "train.save_every=30", "train.sample_n=50", "train.sample_steps=8", "train.sample_sampler=null",
                     "train.tensorboard=false", f"train.out_dir={root}", "train.name=teacher", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "teacher"


def _reflow_args(teacher, out, name, *more):
    return ["reflow", str(teacher), "--pairs", "300", "--steps", "8", "reflow.chunk=100", "train.steps=8",
            "train.save_every=4", "train.log_every=1", f"train.out_dir={out}", f"train.name={name}", "--no-progress",
            *more]


def _same_tensors(a, b) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, b)


def _chunks(run_dir) -> list:
    return [chunk_path(run_dir, k) for k in range(3)]


def test_reflow_resumes_a_crash_in_the_pairs_and_a_stop_in_training(flow_teacher, tmp_path, monkeypatch, one_thread,
                                                                  capsys):
    assert main(_reflow_args(flow_teacher, tmp_path, "straight")) == 0
    straight = tmp_path / "straight"
    # a crash while the third chunk is drawn: the first two are whole, the third is not there
    calls, ode = [], pairs_module.teacher_ode

    def crash_at_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ode(*args)

    monkeypatch.setattr(pairs_module, "teacher_ode", crash_at_third)
    assert main(_reflow_args(flow_teacher, tmp_path, "crashed")) == 130
    monkeypatch.undo()
    crashed = tmp_path / "crashed"
    first, second, third = _chunks(crashed)
    assert first.is_file() and second.is_file() and not third.exists()
    assert not list((crashed / "pairs").glob(".*"))  # no temporary file left
    kept = [(p.stat().st_mtime_ns, p.read_bytes()) for p in (first, second)]
    capsys.readouterr()
    # continued: only the third chunk drawn, then training stopped after 4 steps, then continued to 8
    reflow_run(resume_dir=crashed, progress=False, stop_after=4)
    assert "(100 drawn now" in capsys.readouterr().out
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in (first, second)] == kept
    assert main(["reflow", "--resume", str(crashed), "--no-progress"]) == 0
    assert "(0 drawn now" in capsys.readouterr().out
    for a, b in zip(_chunks(straight), _chunks(crashed)):
        _same_tensors(a, b)  # the same pairs as an uninterrupted reflow
    end = "checkpoints/step_0000008"
    for name in ("model", "ema", "optimizer"):  # and the same training
        _same_tensors(straight / end / f"{name}.safetensors", crashed / end / f"{name}.safetensors")
    # the reflowed run is a flow run that samples in one Euler step by default, and in two
    out = tmp_path / "one.png"
    assert main(["sample", str(crashed), "--n", "8", "--out", str(out), "--no-progress"]) == 0
    assert "flow_euler, 1 steps" in capsys.readouterr().out and out.is_file()
    assert main(["sample", str(crashed), "--sampler", "flow_euler", "--steps", "2", "--step-schedule", "trailing",
                 "--n", "8", "--out", str(tmp_path / "two.png"), "--no-progress"]) == 0
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 2  # not a plain training run
    assert "ddpm reflow --resume" in capsys.readouterr().err


def test_reflow_starts_from_the_teachers_ema_weights(flow_teacher, tmp_path, one_thread):
    # at learning rate 0 the network and its EMA stay the teacher's EMA weights
    assert main(_reflow_args(flow_teacher, tmp_path, "frozen", "train.lr=0", "train.steps=1")) == 0
    teacher = flow_teacher / "checkpoints" / "step_0000030" / "ema.safetensors"
    for name in ("model", "ema"):
        _same_tensors(tmp_path / "frozen" / "checkpoints" / "step_0000001" / f"{name}.safetensors", teacher)


def test_a_teacher_that_is_no_flow_run_is_refused_in_one_line(flow_teacher, tmp_path, capsys):
    ddpm = tmp_path / "ddpm"
    shutil.copytree(flow_teacher, ddpm)
    config = ddpm / "config.yaml"
    config.write_text(config.read_text().replace("process: flow", "process: ddpm")
                      .replace("prediction: velocity", "prediction: eps"))
    capsys.readouterr()
    assert main(["reflow", str(ddpm), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a ddpm run, not a flow run" in err, err
    assert main(["reflow", str(flow_teacher), "model.kind=unet", "--no-progress"]) == 2
    assert "model.kind cannot change in a reflow" in capsys.readouterr().err


@pytest.mark.parametrize("key, kind", [("reflow.teacher", "reflow"), ("finetune.source", "fine-tuning"),
                                       ("controlnet.base", "ControlNet")])
def test_resuming_a_derived_run_refuses_a_folder_of_another_kind(tmp_path, key, kind):
    """ddpm reflow/finetune/train-controlnet --resume of a plain training run: one line naming the missing key;
    the run of the right kind resumes with its stored config."""
    cfg = load_config("mnist", [])  # flow matching: a reflow's teacher must be a flow run
    (tmp_path / "plain").mkdir()
    save_run_config(cfg, tmp_path / "plain")
    with pytest.raises(DDPMError) as e:
        resume_derived(tmp_path / "plain", [], key, kind)
    assert str(e.value) == (f"'{tmp_path / 'plain'}' is not a {kind} run (no {key} in its config.yaml); continue "
                            f"a training run with `ddpm train --resume {tmp_path / 'plain'}`")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, "runs/source")
    (tmp_path / "derived").mkdir()
    save_run_config(cfg, tmp_path / "derived")
    run_dir, resumed = resume_derived(tmp_path / "derived", ["train.steps=7"], key, kind)
    assert run_dir == tmp_path / "derived" and getattr(getattr(resumed, section), name) == "runs/source"
    assert resumed.train.steps == 7
