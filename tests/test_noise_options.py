"""Zero terminal SNR (Lin et al. 2024) and offset noise (Guttenberg 2023): against diffusers and exact answers."""

import pytest
import torch

from ddpmlab.config import load_config
from ddpmlab.diffusion.schedules import NoiseSchedule, log_sigmas, make_betas, rescale_zero_terminal_snr
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import SAMPLERS, ModelPredictor
from ddpmlab.training.distributed import draw_t_and_noise

MU, STD = 0.3, 0.5  # 1-D Gaussian data N(MU, STD^2)


def test_rescaled_betas_equal_diffusers_and_reach_zero_snr():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as theirs

    betas = make_betas("linear", 1000)
    ours = rescale_zero_terminal_snr(betas)
    assert torch.allclose(ours, theirs(betas.clone()).double(), atol=1e-12)
    s = NoiseSchedule.from_betas(ours)
    assert s.alphas_cumprod[-1] == 0 and ours[-1] == 1
    assert torch.allclose(s.alphas_cumprod[0], NoiseSchedule.from_betas(betas).alphas_cumprod[0])
    assert torch.isfinite(log_sigmas(s)).all()  # solvers see a finite (clipped) sigma_max


def test_zero_terminal_snr_from_config_and_eps_prediction_is_refused():
    cfg = load_config("mnist_ddpm", ["diffusion.zero_terminal_snr=true", "diffusion.prediction=v"])
    assert NoiseSchedule.from_config(cfg.diffusion).alphas_cumprod[-1] == 0
    with pytest.raises(ConfigError, match="zero_terminal_snr.*prediction v"):
        load_config("mnist_ddpm", ["diffusion.zero_terminal_snr=true"])


class ExactV(torch.nn.Module):
    """The exact v-predictor of 1-D Gaussian data, defined at alpha_bar = 0 too (x0_hat = MU there)."""

    def __init__(self, schedule):
        super().__init__()
        self.s = schedule

    def forward(self, x, t, y=None):
        abar = self.s.alphas_cumprod[torch.as_tensor(t).long().reshape(-1)].to(x.dtype).reshape(-1, 1)
        x0 = MU + abar.sqrt() * STD**2 / (abar * STD**2 + 1 - abar) * (x - abar.sqrt() * MU)  # E[x0 | x_t]
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0  # v (Salimans & Ho 2022)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 100)])
def test_samplers_on_a_zero_snr_schedule_reproduce_the_data(sampler, steps):
    s = NoiseSchedule.from_betas(rescale_zero_terminal_snr(make_betas("linear", 1000)))
    predict = ModelPredictor(ExactV(s), s, "v")
    g = torch.Generator().manual_seed(0)
    x = SAMPLERS[sampler](predict, s, torch.randn(20000, 1, generator=g, dtype=torch.float64), steps, generator=g)
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) - STD) < 0.02


def test_offset_noise_adds_a_shift_per_image_and_channel():
    x0 = torch.zeros(4000, 3, 8, 8)
    draw = lambda offset: draw_t_and_noise(lambda b, device, generator: torch.zeros(b, dtype=torch.long), x0,
                                           4000, 0, torch.Generator().manual_seed(1), offset)[1]
    plain, offset = draw(0.0), draw(0.5)
    means = offset.mean((2, 3))  # per image and channel: variance 1/64 + 0.25
    assert abs(float(means.var()) - (1 / 64 + 0.25)) < 0.02
    assert abs(float(plain.mean((2, 3)).var()) - 1 / 64) < 0.003
    assert torch.equal(plain, draw(0.0))  # no offset: the same noise as before
