"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024), against exact answers."""

import math

import pytest
import torch
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.errors import ConfigError
from ddpmlab.training.posthoc_ema import (
    PowerEMA,
    gamma_of_sigma_rel,
    list_snapshots,
    posthoc_weights,
    power_beta,
    profile_inner,
    reconstruct,
    save_snapshot,
    sigma_rel_of_gamma,
)


def test_sigma_rel_and_gamma_are_inverse_and_match_the_papers_values():
    for s in (0.01, 0.05, 0.1, 0.2):
        assert sigma_rel_of_gamma(gamma_of_sigma_rel(s)) == pytest.approx(s, rel=1e-9)
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2, Sec. 3.1
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ConfigError, match="sigma_rel must be in"):
        gamma_of_sigma_rel(0.3)


def _trajectory(steps: int) -> torch.Tensor:
    """theta_1..theta_T of one 'weight': a drifting random walk, float64 (T, 3)."""
    g = torch.Generator().manual_seed(0)
    walk = torch.cumsum(torch.randn(steps, 3, generator=g, dtype=torch.float64) * 0.1, 0)
    return walk + torch.linspace(0, 2, steps, dtype=torch.float64)[:, None]


class _Param(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))


def _track(sigma_rels, thetas, every):
    """Run PowerEMA over the trajectory; snapshots {(step, gamma): value} every ``every`` steps."""
    model = _Param()
    ema = PowerEMA(model, sigma_rels)
    snaps = {}
    for t, theta in enumerate(thetas, start=1):
        model.w.data.copy_(theta)
        ema.update(model, t)
        if t % every == 0:
            for g, c in zip(ema.gammas, ema.copies):
                snaps[(t, g)] = c.w.detach().clone()
    return ema, snaps


def test_power_ema_is_the_weighted_average_its_betas_telescope_to():
    thetas = _trajectory(400)
    ema, _ = _track([0.1], thetas, 400)
    g, t = ema.gammas[0], len(thetas)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    w = (1 - (1 - 1 / tau) ** (g + 1)) * (tau / t) ** (g + 1)  # the telescoped product of the betas
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(ema.copies[0].w, (w[:, None] * thetas).sum(0), atol=1e-10)
    assert power_beta(1, g) == 0.0  # step 1: the EMA is the weights


def test_reconstructing_a_stored_profile_returns_it_to_1e6():
    thetas = _trajectory(600)
    ema, snaps = _track([0.05, 0.1], thetas, 100)
    keys = list(snaps)
    target = (600, ema.gammas[1])
    x = posthoc_weights(keys, *target)
    rebuilt = sum(c * snaps[k] for c, k in zip(x.tolist(), keys))
    assert torch.allclose(rebuilt, snaps[target], atol=1e-6)


def test_an_unstored_width_is_rebuilt_close_to_tracking_it_directly():
    thetas = _trajectory(1000)
    _, snaps = _track([0.05, 0.15], thetas, 50)
    direct, _ = _track([0.09], thetas, 1000)
    x = posthoc_weights(list(snaps), 1000, gamma_of_sigma_rel(0.09))
    rebuilt = sum(c * v for c, v in zip(x.tolist(), snaps.values()))
    spread = float((thetas[-300:] - direct.copies[0].w).abs().max())  # how far weights are from the EMA
    assert float((rebuilt - direct.copies[0].w).abs().max()) < 0.05 * spread
    assert math.isclose(profile_inner(10, 2.0, 10, 2.0), 9 / 50)  # <p, p> of (g+1) tau^g / t^(g+1): (g+1)^2/((2g+1) t)


def test_training_with_ema_profiles_writes_snapshots_resumes_and_ddpm_ema_rebuilds(tmp_path, capsys):
    common = ["train", "--config", "toy2d", f"train.out_dir={tmp_path}", "train.save_every=6",
              "train.ema_snapshot_every=3", "train.ema_profiles=[0.05,0.1]", "train.sample_n=8",
              "train.sample_steps=2", "train.tensorboard=false", "--no-progress"]
    assert main([*common, "train.name=r", "train.steps=12"]) == 0
    run = tmp_path / "r"
    snaps = list_snapshots(run)
    assert [(s, r) for s, r, _ in snaps][:4] == [(3, 0.05), (3, 0.1), (6, 0.05), (6, 0.1)] and len(snaps) == 8
    # resumed from step 6 with the profiles restored: the same snapshots as the uninterrupted run
    whole = {(s, r): load_file(str(p)) for s, r, p in snaps}
    assert main([*common, "train.name=h", "train.steps=6"]) == 0
    assert main(["train", "--resume", str(tmp_path / "h"), "train.steps=12", "--no-progress"]) == 0
    for s, r, p in list_snapshots(tmp_path / "h"):
        assert all(torch.equal(v, whole[(s, r)][k]) for k, v in load_file(str(p)).items()), (s, r)
    # a stored width comes back (to rounding), and the file loads with ddpm sample
    weights, step, _ = reconstruct(run, 0.1)
    assert step == 12 and all(torch.allclose(v, whole[(12, 0.1)][k], atol=1e-5) for k, v in weights.items())
    capsys.readouterr()
    assert main(["ema", str(run), "--sigma-rel", "0.07"]) == 0
    out = run / "ema" / "posthoc_sigma0.070_step0000012.safetensors"
    assert out.is_file() and "--weights-file" in capsys.readouterr().out
    assert main(["sample", str(run), "--weights-file", str(out), "--n", "4", "--steps", "2", "--no-progress"]) == 0


def test_a_run_without_profiles_says_how_to_get_them(tmp_path, capsys):
    assert main(["train", "--config", "toy2d", f"train.out_dir={tmp_path}", "train.name=r", "train.steps=2",
                 "train.sample_n=4", "train.sample_steps=2", "train.tensorboard=false", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ema", str(tmp_path / "r"), "--sigma-rel", "0.05"]) == 2
    assert "train.ema_profiles" in capsys.readouterr().err
    save_snapshot(tmp_path / "x", 5, 0.05, {"w": torch.zeros(1)})
    assert [s for s, _, _ in list_snapshots(tmp_path / "x")] == [5]
