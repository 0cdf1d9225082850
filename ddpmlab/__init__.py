"""ddpmlab: denoising diffusion probabilistic models (Ho et al. 2020) and what came after."""

__version__ = "0.1.0"
