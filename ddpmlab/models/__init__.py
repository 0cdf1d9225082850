"""Denoiser networks: the DDPM UNet for images, a residual MLP for 2D toy data, DiffWave for sound."""

from ddpmlab.models.build import build_model, count_parameters
from ddpmlab.models.diffwave import DiffWave
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.models.unet import UNet, timestep_embedding

__all__ = ["UNet", "MLPDenoiser", "DiffWave", "build_model", "count_parameters", "timestep_embedding"]
