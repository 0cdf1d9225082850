"""Few-step students (ddpm distill) against exact answers.

The teacher is the exact eps* of a 2-D Gaussian mixture (ddpmlab.diffusion.analytic), so the
truth is known: students must land closer (sliced Wasserstein distance to exact mixture samples)
than DDIM on that exact denoiser with the same number of steps.  Measured once on a 2-core AMD EPYC
(4,000 samples, fixed seeds; SWD of exact mixture samples to each other ~0.02):

    steps                       1      4
    DDIM on the exact eps*   1.435  0.560
    progressive student      0.124  0.118   (1 step: rounds 16 -> 8 -> 4, then 4 -> 2 -> 1)
    consistency student      0.140    -     (2 steps: 0.136; DDIM 2 steps: 1.426)
"""

from __future__ import annotations

import pytest
import torch

from ddpmlab.config import config_from_dict
from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule, sigma_of_t
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.toy import sliced_wasserstein
from ddpmlab.io.checkpoint import find_checkpoint, load_weights
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.samplers.solvers import euler, heun
from ddpmlab.samplers.student import (
    abar_of_level,
    consistency_fn,
    ddim_move,
    level_time,
    ode_step,
    progressive_target,
    sigma_range,
    student,
    ve_x0,
)
from ddpmlab.training.tasks.distill import distill, student_config

MIX = GaussianMixture.ring(k=4, radius=2.0, std=0.3)
SCHED = NoiseSchedule.make("linear", 1000)
TEACHER = ExactDenoiser(MIX, SCHED)
N = 4000


def data(n, gen):
    return MIX.sample(n, generator=gen).float(), None


def cfg_for(**distill_keys):
    return config_from_dict({
        "data": {"dataset": "toy"}, "model": {"kind": "mlp"}, "mlp": {"hidden": 64, "num_layers": 2, "time_embed_dim": 32},
        "train": {"device": "cpu", "log_every": 100, "save_every": 100000, "tensorboard": False},
        "distill": {"teacher": "exact-mixture", "batch_size": 128, "lr": 1e-3, "ema_decay": 0.99, **distill_keys}})


def mlp():
    torch.manual_seed(0)
    return MLPDenoiser(2, 64, 2, 32)


def swd(x):
    ref = MIX.sample(N, generator=torch.Generator().manual_seed(1)).float()
    return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(3))


def noise():
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(2))


def ddim_swd(steps):
    return swd(SAMPLERS["ddim"](ModelPredictor(TEACHER, SCHED, "eps"), SCHED, noise(), steps))


def trained(run_dir, model):
    model.load_state_dict(load_weights(run_dir, "ema"))
    return model.eval()


@pytest.fixture(scope="module")
def progressive4(tmp_path_factory):
    """A 4-step progressive student of the exact teacher: rounds 16 -> 8 -> 4 teacher steps (~8 s)."""
    run = tmp_path_factory.mktemp("distill") / "p4"
    cfg = cfg_for(method="progressive", steps=4, teacher_steps=16, iterations=[400, 250])
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, run, progress=False, write_samples=False)
    return trained(run, mlp())


def test_progressive_target_is_what_one_student_ddim_step_must_predict_to_land_on_two_teacher_steps():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    pred = ModelPredictor(TEACHER, SCHED, "eps")
    t, t1, t2 = (level_time(SCHED, u) for u in (0.75, 0.625, 0.5))
    a, a1, a2 = (abar_of_level(SCHED, s).reshape(1, 1) for s in (t, t1, t2))
    z1 = ddim_move(z, pred(z, t.expand(64))[1], a, a1)
    z2 = ddim_move(z1, pred(z1, t1.expand(64))[1], a1, a2)
    x_tilde = progressive_target(z, z2, a, a2)
    torch.testing.assert_close(ddim_move(z, x_tilde, a, a2), z2, rtol=0, atol=1e-10)
    # the last step (to clean data, alpha_bar = 1) targets the teacher's result itself
    assert float(abar_of_level(SCHED, level_time(SCHED, 0.0))) == 1.0
    torch.testing.assert_close(progressive_target(z, z2, a, torch.ones(1, 1, dtype=torch.float64)), z2)


def test_progressive_students_beat_ddim_on_the_exact_denoiser_at_4_and_1_steps(progressive4, tmp_path):
    four = swd(student(ModelPredictor(progressive4, SCHED, "v"), SCHED, noise(), 4, distilled_steps=4))
    assert ddim_swd(4) > 0.5  # 0.560
    assert four < 0.25, four  # 0.118
    # continue to one step: the 4-step student is the teacher of rounds 4 -> 2 -> 1
    run = tmp_path / "p1"
    cfg = cfg_for(method="progressive", steps=1, teacher_steps=4, iterations=[250, 300])
    distill(cfg, progressive4, "v", trained_copy(progressive4), SCHED, data, run, progress=False, write_samples=False)
    one = swd(student(ModelPredictor(trained(run, mlp()), SCHED, "v"), SCHED, noise(), 1, distilled_steps=1))
    assert ddim_swd(1) > 1.3  # 1.435: one DDIM step is E[x_0 | x_T], the mixture's mean
    assert one < 0.45, one  # 0.124


def trained_copy(model):
    m = mlp()
    m.load_state_dict(model.state_dict())
    return m.train()


def test_consistency_student_beats_ddim_in_one_step(tmp_path):
    run = tmp_path / "cd"
    cfg = cfg_for(method="consistency", steps=1, iterations=[500], target_ema=0.9, n_start=10, n_end=40)
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, run, progress=False, write_samples=False)
    model = trained(run, mlp())
    one = swd(student(ModelPredictor(model, SCHED, "v"), SCHED, noise(), 1, method="consistency"))
    two = swd(student(ModelPredictor(model, SCHED, "v"), SCHED, noise(), 2, method="consistency",
                      generator=torch.Generator().manual_seed(5)))
    assert ddim_swd(1) > 1.3 and ddim_swd(2) > 1.3  # 1.435, 1.426
    assert one < 0.3, one  # 0.140
    assert two < 0.3, two  # 0.136


def test_consistency_boundary_condition_holds_exactly():
    model = mlp()
    torch.nn.init.normal_(model.fc_out.weight)  # a network far from the identity
    smin, _ = sigma_range(SCHED)
    x = torch.randn(32, 2) * 3
    f = consistency_fn(ModelPredictor(model, SCHED, "v"), x, torch.full((32,), smin, dtype=torch.float64), smin, 0.5)
    assert torch.equal(f, x)
    assert smin == pytest.approx(float(sigma_of_t(SCHED, torch.tensor(0.0))), rel=1e-12)
    # above sigma_min f leaves x
    f2 = consistency_fn(ModelPredictor(model, SCHED, "v"), x, torch.full((32,), 1.0, dtype=torch.float64), smin, 0.5)
    assert not torch.allclose(f2, x)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_ode_step_is_the_solvers_step(solver):
    """ode_step per example equals the first step of ddpmlab's euler / heun solvers on the same levels."""
    pred = ModelPredictor(TEACHER, SCHED, "eps")
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = torch.tensor([700.0, 400.0], dtype=torch.float64)
    seen = []
    fn, nfe = (euler, 2) if solver == "euler" else (heun, 3)
    fn(pred, SCHED, x_T, nfe, timesteps=ts, callback=lambda k, x, x0: seen.append(x))
    s_hi, s_lo = sigma_of_t(SCHED, ts)
    x_ve = x_T * (1 + s_hi**2).sqrt()
    got = ode_step(lambda x, s: ve_x0(pred, x, s), x_ve, s_hi.expand(16), s_lo.expand(16), solver)
    torch.testing.assert_close(got / (1 + s_lo**2).sqrt(), seen[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_resume_is_bit_identical(tmp_path, method):
    if method == "progressive":
        keys = dict(method=method, steps=2, teacher_steps=8, iterations=[12, 12], batch_size=32)
    else:
        keys = dict(method=method, steps=1, iterations=[24], batch_size=32, n_start=4, n_end=8)
    cfg = cfg_for(**keys)
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, tmp_path / "a", progress=False, write_samples=False)
    # stopped after 12 iterations (a round boundary for progressive), then resumed
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, tmp_path / "b", progress=False, write_samples=False,
            stop_after=12)
    distill(cfg, TEACHER, "eps", mlp(), SCHED, data, tmp_path / "b", progress=False, write_samples=False,
            resume=True)
    _, a, _ = find_checkpoint(tmp_path / "a")
    _, b, _ = find_checkpoint(tmp_path / "b")
    assert a["step"] == b["step"] == 24
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a["weights"]["extra"]:
        assert torch.equal(a["weights"]["extra"][k], b["weights"]["extra"][k])
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][k]))


def test_bad_input_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="power of two; got 3"):
        cfg_for(method="progressive", steps=3)
    with pytest.raises(ConfigError, match="distilled for 4 steps and cannot take more"):
        student(ModelPredictor(mlp(), SCHED, "v"), SCHED, noise()[:4], 8, method="progressive", distilled_steps=4)
    cfg_for(method="consistency", steps=3)  # consistency students take any number of steps
    ae = tmp_path / "ae"
    ae.mkdir()
    (ae / "config.yaml").write_text("stage: autoencoder\n")
    with pytest.raises(DDPMError, match="not a diffusion run"):
        student_config(ae, "progressive", 4, [])
