"""Denoiser networks: the DDPM UNet for images and a residual MLP for 2D toy data."""

from ddpmlab.models.build import build_model, count_parameters
from ddpmlab.models.mlp import MLPDenoiser
from ddpmlab.models.unet import UNet, timestep_embedding

__all__ = ["UNet", "MLPDenoiser", "build_model", "count_parameters", "timestep_embedding"]
