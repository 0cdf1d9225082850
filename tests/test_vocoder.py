"""DiffWave as a vocoder: the audio quality measures (librosa and scipy as oracles), the local conditioner and
DiffWave's fast sampling (a vocoder run end to end: tests/test_vocoder_run.py)."""

import math

import numpy as np
import pytest
import torch
from _util import perturb

from ddpmlab.config import Config, config_from_dict
from ddpmlab.data.mel import config_mel, log_mel, mel_spectrogram
from ddpmlab.diffusion.analytic import ExactDenoiser, Gaussian
from ddpmlab.diffusion.schedules import NoiseSchedule, abar_of_t
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.audio_quality import (
    griffin_lim_from_mel,
    mel_cepstra,
    mel_cepstral_distortion,
    mel_to_linear,
    mr_stft_distance,
    stft_distance,
)
from ddpmlab.evaluate.vocoder import check_vocoder
from ddpmlab.models.diffwave import DiffWave, MelUpsampler
from ddpmlab.runs import Run
from ddpmlab.samplers.ancestral import ddpm, diffwave_fast
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.steps import DIFFWAVE_FAST_BETAS, diffwave_timesteps

librosa = pytest.importorskip("librosa")  # the oracle of the mel-cepstra


def tone(freq: float, rate: int, n: int, amplitude: float = 0.5) -> torch.Tensor:
    return amplitude * torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / rate + 0.3)


def noise(n: int, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------- the measures
def test_the_mr_stft_distance_is_zero_to_itself_and_grows_with_added_noise():
    x = tone(440, 16000, 8000) + noise(8000, 1, 0.01)
    assert mr_stft_distance(x, x) == 0
    levels = [float(mr_stft_distance(x + s * noise(8000, 2), x)) for s in (0.003, 0.03, 0.3, 3.0)]
    assert levels[0] > 0 and all(a < b for a, b in zip(levels, levels[1:])), levels


@pytest.mark.parametrize("gain", [0.5, 2.0])
def test_each_resolution_of_a_scaled_signal_is_its_analytic_value(gain):
    """|S(a x)| = a |S(x)|: spectral convergence |1 - a| plus log-magnitude L1 |ln a| (Yamamoto et al., Eqs. 3-4)."""
    x = noise(6000, 3)
    for n_fft, win, hop in ((512, 240, 50), (2048, 1200, 240)):
        assert math.isclose(float(stft_distance(gain * x, x, n_fft, win, hop)), abs(1 - gain) + abs(math.log(gain)),
                            rel_tol=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        mr_stft_distance(x, x[:100])


def test_mel_cepstra_are_librosas_dct_of_the_log_mel_in_the_real_cepstrums_scale():
    x = (tone(300, 16000, 6000) + noise(6000, 4, 0.05)).numpy()
    logmel = log_mel(mel_spectrogram(torch.from_numpy(x), 16000, 1024, 256, 80, 20.0))
    theirs = librosa.feature.mfcc(S=logmel.numpy(), n_mfcc=25, dct_type=2, norm="ortho")
    k = 80  # orthonormal DCT-II: sqrt(1/K) (d = 0), sqrt(2/K) (d > 0) times the plain sum; ours: the sum / K
    scale = np.array([math.sqrt(k)] + [math.sqrt(2 * k)] * 24)[:, None]
    assert np.abs(mel_cepstra(logmel).numpy() - theirs / scale).max() < 1e-9


def test_mcd_is_zero_for_identical_signals_and_ignores_the_level_c0():
    x, y = tone(500, 16000, 8000) + noise(8000, 5, 0.05), noise(8000, 6)
    assert mel_cepstral_distortion(x, x, 16000) == 0
    assert float(mel_cepstral_distortion(0.25 * x, x, 16000)) < 1e-9  # a gain moves c_0 only
    mcd = float(mel_cepstral_distortion(y, x, 16000))
    frames = [mel_cepstra(log_mel(mel_spectrogram(s, 16000)))[1:] for s in (y, x)]
    by_hand = 10 / math.log(10) * torch.sqrt(2 * (frames[0] - frames[1]).pow(2).sum(0)).mean()
    assert mcd > 1 and math.isclose(mcd, float(by_hand), rel_tol=1e-12)


def test_nnls_of_the_filter_bank_matches_scipys_residual():
    from scipy.optimize import nnls

    g = torch.Generator().manual_seed(7)
    bank = torch.rand(60, 40, generator=g, dtype=torch.float64)  # more equations than unknowns: a residual stays
    target = torch.rand(60, 5, generator=g, dtype=torch.float64) - 0.3  # and some constraints S >= 0 are active
    ours = mel_to_linear(target, bank, iterations=5000)
    assert ours.min() >= 0
    for j in range(5):
        theirs = nnls(bank.numpy(), target[:, j].numpy())[1]
        assert float(torch.linalg.vector_norm(bank @ ours[:, j] - target[:, j])) <= theirs * 1.02 + 1e-9


def test_griffin_lim_on_a_sines_mel_recovers_its_frequency_and_beats_noise(tmp_path):
    cfg = config_from_dict({"data": {"dataset": "audio", "path": str(tmp_path), "channels": 1, "length": 16000},
                            "model": {"kind": "diffwave"}})
    x = tone(440, 16000, 16000)
    y = griffin_lim_from_mel(config_mel(x.float(), cfg.data), 16000, cfg.data,
                             generator=torch.Generator().manual_seed(0)).double()
    peak = float(torch.fft.rfft(y).abs().argmax())  # 1 Hz bins
    assert abs(peak - 440) < 30  # within the mel band (about 60 Hz wide at 440 Hz) the energy was spread over
    assert float(mr_stft_distance(y, x)) < 0.25 * float(mr_stft_distance(noise(16000, 8, 0.5), x))
    assert float(mel_cepstral_distortion(y, x, 16000)) < 3.0


# ------------------------------------------------------------------------------ the local conditioner
@pytest.mark.parametrize("strides,frames", [((16, 16), 7), ((4, 5), 11), ((3, 3, 3), 4), ((8,), 1)])
def test_the_upsampler_gives_exactly_hop_samples_per_frame(strides, frames):
    up = MelUpsampler(strides)
    assert up(torch.randn(2, 10, frames)).shape == (2, 10, frames * math.prod(strides))


def test_a_fresh_mel_conditioner_leaves_the_unconditional_network_unchanged_until_it_learns(one_thread):
    torch.manual_seed(0)
    plain = perturb(DiffWave(1, layers=4, channels=8, dilation_cycle=2, embed_dim=16), scale=0.3)
    vocoder = DiffWave(1, layers=4, channels=8, dilation_cycle=2, embed_dim=16, mel_channels=12, upsample=(4, 4))
    missing, unexpected = vocoder.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("upsampler") or ".mel_proj." in k for k in missing)
    x, t = torch.randn(3, 1, 160), torch.tensor([0, 10, 40])
    mel = torch.randn(3, 12, 1 + 160 // 16)
    with torch.no_grad():
        assert torch.equal(vocoder(x, t, cond=mel), plain(x, t))
    opt = torch.optim.SGD(vocoder.parameters(), lr=0.1)
    (vocoder(x, t, cond=mel) - x).pow(2).mean().backward()
    assert vocoder.residual_layers[0].mel_proj.weight.grad.abs().max() > 0  # it learns from the first step
    opt.step()
    with torch.no_grad():
        assert (vocoder(x, t, cond=mel) - vocoder(x, t, cond=-mel)).abs().max() > 1e-6  # and the mel is heard


# ------------------------------------------------------------------------------ DiffWave's fast sampling
def test_the_fast_schedules_levels_are_the_papers():
    """Kong et al. 2021, App. B: gamma_s = prod (1 - beta_i) of beta = 1e-4 ... 0.5, on T = 50 (1e-4 .. 0.05)."""
    schedule = NoiseSchedule.make("linear", 50, 1e-4, 0.05)
    ts = diffwave_timesteps(schedule, 6)
    gamma = np.cumprod(1 - np.array(DIFFWAVE_FAST_BETAS))[::-1]
    assert np.abs(abar_of_t(schedule, ts).numpy() - gamma).max() < 1e-12
    assert ts[-1] == 0 and 42 < ts[0] < 44 and bool((ts[1:] < ts[:-1]).all())


def test_fast_sampling_is_the_papers_update_and_on_every_timestep_ddpm_with_beta_tilde():
    schedule = NoiseSchedule.make("linear", 50, 1e-4, 0.05)
    predict = ModelPredictor(ExactDenoiser(Gaussian(torch.zeros(8) + 0.2, 0.3 * torch.eye(8)), schedule), schedule)
    x_T = torch.randn(5, 1, 8, generator=torch.Generator().manual_seed(0))
    ours = diffwave_fast(predict, schedule, x_T, 6, generator=torch.Generator().manual_seed(1))
    # the paper's loop (Kong et al. 2021, Alg. 2 on the fast schedule): c1 (x - c2 eps) + sigma z
    beta = torch.tensor(DIFFWAVE_FAST_BETAS, dtype=torch.float64)
    gamma = torch.cumprod(1 - beta, 0)
    ts, g, x = diffwave_timesteps(schedule, 6), torch.Generator().manual_seed(1), x_T.double()
    for s in range(5, -1, -1):
        eps, _ = predict(x.float(), ts[5 - s])
        x = (x - beta[s] / torch.sqrt(1 - gamma[s]) * eps.double()) / torch.sqrt(1 - beta[s])
        if s > 0:
            x = x + torch.sqrt((1 - gamma[s - 1]) / (1 - gamma[s]) * beta[s]) * torch.randn(x.shape, generator=g)
    assert (ours.double() - x).abs().max() < 1e-4
    every = diffwave_fast(predict, schedule, x_T, 50, timesteps="uniform", generator=torch.Generator().manual_seed(2))
    plain = ddpm(predict, schedule, x_T, variance="fixed_small", generator=torch.Generator().manual_seed(2))
    assert (every - plain).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="diffwave_fast takes variance fixed_small"):
        diffwave_fast(predict, schedule, x_T, 6, variance="learned_range")


def test_an_image_run_is_not_a_vocoder():
    cfg = Config()
    run = Run(cfg, torch.nn.Identity(), NoiseSchedule.make("linear", 10), torch.device("cpu"))
    with pytest.raises(DDPMError, match=r"is an image run \(data.dataset=mnist\); --audio needs a vocoder run"):
        check_vocoder(run)
