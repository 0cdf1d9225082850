"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

import torch

from ddpmlab.cli import main


def perturb(model, seed=0, scale=0.05):
    """Random values for every parameter (a new UNet outputs zeros: its last layers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and p.dim() == 1 and "norm" in name
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if is_norm_scale else 0.0))
    return model


# A tiny digit UNet on the 180 test digits at batch 32: an epoch is 5 steps, so the 24 steps of the
# shared `straight_run` (tests/conftest.py) cross epoch boundaries and stop mid-epoch.
TINY_DIGITS = ["--config", "mnist", "data.dataset=digits", "data.split=test", "unet.base_channels=16",
               "unet.norm_groups=8", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[4]",
               "unet.dropout=0.1", "train.batch_size=32", "train.ema_start=3", "train.warmup_steps=5",
               "train.save_every=4", "train.sample_n=4", "train.sample_steps=2", "train.log_every=1", "--no-progress"]
STRAIGHT_STEPS = 24


def one_line_error(capsys, args, *expected) -> str:
    """``ddpm ARGS`` exits with 2 and one line on stderr holding every ``expected`` piece; returns that line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(e in err for e in expected), err
    return err
