"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

import torch


def perturb(model, seed=0, scale=0.05):
    """Random values for every parameter (a new UNet outputs zeros: its last layers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and p.dim() == 1 and "norm" in name
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if is_norm_scale else 0.0))
    return model
