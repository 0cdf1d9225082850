"""Few-step students of flow teachers (ddpm distill on a diffusion.process=flow run) against exact answers.

The teacher is the exact velocity of a 2-D Gaussian mixture (ddpmlab.diffusion.analytic.ExactVelocity), so
its Euler steps are known in closed form.  The student predicts the velocity as its teacher does; a
progressive student walks Euler steps on t = k/N, and a consistency student's one step is one Euler step of
its own velocity from t = 1 (ddpmlab.samplers.student).  Measured once on a 2-core AMD EPYC (4,000 samples,
fixed seeds; sliced Wasserstein distance to exact mixture samples; the exact velocity integrated by 50
Euler steps: 0.057):

    sampling steps                         1      2
    Euler on the exact velocity        1.448  0.508   (1 step: the mixture's mean)
    progressive student (2 -> 1)       0.509    -     (mean distance to the teacher's 2 steps: 0.017)
    consistency student                0.196  0.175
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

import ddpmlab.training.tasks.distill as distill_module
from ddpmlab.cli import main
from ddpmlab.config import DiffusionConfig, config_from_dict, load_config, save_config
from ddpmlab.diffusion.analytic import ExactVelocity, GaussianMixture
from ddpmlab.diffusion.flow import flow_from_vp
from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.toy import sliced_wasserstein
from ddpmlab.io.checkpoint import find_checkpoint, load_weights
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.runs import SamplingRequest, load_run, plan_request
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.student import student
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.tasks.distill import distill, student_config

MIX = GaussianMixture.ring(k=4, radius=2.0, std=0.3)
FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity"]
SCHED = NoiseSchedule.from_config(DiffusionConfig(process="flow", prediction="velocity"))
T = SCHED.num_timesteps
TEACHER = ExactVelocity(MIX, T)
N = 4000


def data(n, gen):
    return MIX.sample(n, generator=gen).float(), None


def cfg_for(**distill_keys):
    return config_from_dict({
        "data": {"dataset": "toy"}, "model": {"kind": "mlp"},
        "mlp": {"hidden": 64, "num_layers": 2, "time_embed_dim": 32},
        "diffusion": {"process": "flow", "prediction": "velocity", "min_snr_gamma": None},
        "train": {"device": "cpu", "log_every": 100, "save_every": 100000, "tensorboard": False},
        "distill": {"teacher": "exact-velocity", "prediction": "velocity", "batch_size": 128, "lr": 1e-3,
                    "ema_decay": 0.99, **distill_keys}})


def mlp():
    torch.manual_seed(0)
    return MLPDenoiser(2, 64, 2, 32)


def predict(model):
    return ModelPredictor(model, SCHED, "velocity")


def distilled(run_dir, **distill_keys):
    distill(cfg_for(**distill_keys), TEACHER, "velocity", mlp(), SCHED, data, run_dir, progress=False,
            write_samples=False)
    model = mlp()
    model.load_state_dict(load_weights(run_dir, "ema"))
    return model.eval()


def noise(n=N):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(2))


def swd(x):
    ref = MIX.sample(N, generator=torch.Generator().manual_seed(1)).float()
    return float(sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(3)))


def euler(x, times):
    """Euler steps x <- x + (t' - t) v(x, t) of the exact velocity over ``times`` (decreasing)."""
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * TEACHER(x, torch.tensor(t * T))
    return x


# --- the maths: what a step of each student is on a flow ---------------------------------------------

def test_a_progressive_step_on_a_flow_is_an_euler_step_on_t_equal_k_over_n():
    # the top level, training time T - 1 read by the log-sigma interpolation, is the schedule's cap sigma = 4096
    abar_top = abar_of_t(SCHED, torch.tensor(T - 1.0, dtype=torch.float64))
    x_T = noise(256).double()
    x_flow, t_top = flow_from_vp(x_T, abar_top)
    assert float(t_top) == pytest.approx(4096 / 4097, abs=1e-12)
    for n in (1, 2, 4):
        got = student(predict(TEACHER), SCHED, x_T, n, distilled_steps=n)
        want = euler(x_flow, [float(t_top)] + [k / n for k in range(n - 1, -1, -1)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
        assert (got - euler(x_T, [k / n for k in range(n, -1, -1)])).abs().max() < 2e-3  # t = 1 - 2.4e-4 at the top


def test_a_one_step_consistency_sample_of_a_flow_student_is_one_euler_step_of_its_velocity():
    model = mlp().double()
    torch.nn.init.normal_(model.fc_out.weight)  # a velocity far from zero
    x_T = noise(256).double()
    got = student(predict(model), SCHED, x_T, 1, method="consistency")
    # the top level sigma_max = 4096 is flow time t = 4096 / 4097 (the schedule's cap), where c_skip = 1.5e-8
    x_flow, t_top = flow_from_vp(x_T, abar_of_t(SCHED, torch.tensor(T - 1.0, dtype=torch.float64)))
    with torch.no_grad():
        one_euler = x_flow - t_top * model(x_flow, torch.full((256,), float(t_top) * T, dtype=torch.float64))
    assert (one_euler - x_T).abs().mean() > 0.5  # the step moves
    torch.testing.assert_close(got, one_euler, rtol=0, atol=1e-4 * float(x_T.abs().max()))


# --- students of the exact velocity ------------------------------------------------------------------

def test_a_progressive_student_of_the_exact_flow_does_its_teachers_two_euler_steps_in_one(tmp_path, one_thread):
    model = distilled(tmp_path / "p1", method="progressive", steps=1, teacher_steps=2, iterations=[400])
    x_T = noise()
    two = euler(x_T.double(), [1.0, 0.5, 0.0]).float()
    one = student(predict(model), SCHED, x_T, 1, distilled_steps=1)
    gap = (one - two).norm(dim=1).mean()
    assert (euler(x_T.double(), [1.0, 0.0]).float() - two).norm(dim=1).mean() > 0.5  # 1 teacher step: far off
    assert gap < 0.06, gap  # 0.017
    assert abs(swd(one) - swd(two)) < 0.05  # 0.509 against 0.508


def test_a_consistency_student_of_the_exact_flow_beats_one_euler_step(tmp_path, one_thread):
    model = distilled(tmp_path / "cd", method="consistency", steps=1, iterations=[500], target_ema=0.9,
                      n_start=10, n_end=40)
    one = swd(student(predict(model), SCHED, noise(), 1, method="consistency"))
    assert swd(euler(noise().double(), [1.0, 0.0]).float()) > 1.3  # 1.448: the mixture's mean
    assert one < 0.3, one  # 0.196


# --- a flow run on the command line -------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A tiny toy2d flow run: its weights, not its quality, matter here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("toy2d", [f"train.out_dir={tmp_path_factory.mktemp('teacher')}", "train.name=flow", *FLOW,
                                    "train.steps=20", "train.save_every=20", "train.sample_n=16",
                                    "train.sample_sampler=null", "train.sample_steps=4", "train.tensorboard=false"])
        return train(cfg, progress=False)
    finally:
        torch.set_num_threads(n)


def test_a_flow_students_config_reads_its_velocity(flow_run, tmp_path):
    cfg = student_config(flow_run, "consistency", 1, [])
    assert (cfg.diffusion.process, cfg.diffusion.prediction, cfg.distill.prediction) == ("flow", "velocity", "velocity")
    with pytest.raises(ConfigError, match="is a flow run, whose student predicts the velocity"):
        student_config(flow_run, "progressive", 2, ["distill.prediction=v"])
    ddpm_run = tmp_path / "ddpm"
    ddpm_run.mkdir()
    save_config(load_config("toy2d"), ddpm_run / "config.yaml")
    assert student_config(ddpm_run, "consistency", 1, []).diffusion.prediction == "v"
    with pytest.raises(ConfigError, match="is a DDPM run: set distill.prediction to v or x0"):
        student_config(ddpm_run, "consistency", 1, ["distill.prediction=velocity"])


def _terminated_at_the_fifth_step(distill_fn):
    """``distill`` whose data sends SIGTERM (as `kill PID` would) while the student's 5th batch is drawn."""

    def run(cfg, teacher, prediction, student_net, schedule, data_fn, *args, **kwargs):
        calls = []

        def data_(n, gen):
            calls.append(n)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return data_fn(n, gen)

        return distill_fn(cfg, teacher, prediction, student_net, schedule, data_, *args, **kwargs)

    return run


def test_a_consistency_student_of_a_flow_run_resumes_bit_identically_and_samples(flow_run, tmp_path, monkeypatch,
                                                                                 one_thread, capsys):
    keys = ["distill.iterations=[8]", "distill.batch_size=32", "distill.n_start=4", "distill.n_end=8",
            f"train.out_dir={tmp_path}", "train.sample_n=16"]
    assert main(["distill", str(flow_run), "--method", "consistency", "--steps", "1", *keys, "train.name=straight",
                 "--no-progress"]) == 0
    monkeypatch.setattr(distill_module, "distill", _terminated_at_the_fifth_step(distill))
    assert main(["distill", str(flow_run), "--method", "consistency", "--steps", "1", *keys, "train.name=stopped",
                 "--no-progress"]) == 0
    assert "received SIGTERM: saved checkpoint at step 5" in capsys.readouterr().out
    monkeypatch.setattr(distill_module, "distill", distill)
    assert main(["distill", "--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    _, a, _ = find_checkpoint(tmp_path / "straight")
    _, b, _ = find_checkpoint(tmp_path / "stopped")
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["weights"]["extra"][k], b["weights"]["extra"][k]) for k in a["weights"]["extra"])
    # ddpm sample reads the student's velocity with its own sampler, at its one step
    run = load_run(tmp_path / "stopped", device="cpu")
    plan = plan_request(run, SamplingRequest(n=16), log=lambda m: None)
    assert (plan.sampler, plan.steps, plan.options["method"]) == ("student", 1, "consistency")
    assert main(["sample", str(tmp_path / "stopped"), "--n", "16", "--out", str(tmp_path / "s.png"),
                 "--no-progress"]) == 0
    assert (tmp_path / "s.png").is_file()
