"""Inpainting and image-to-image on a trained model: read the picture and mask, sample, lay out.

The sampling itself lives in :mod:`ddpmlab.samplers.inpaint` (RePaint, SDEdit); this module
does what a user's files need: Pillow loading with the model's channels, size checks (an
image is resized only when asked), batching with per-batch seeds, and the side-by-side grid
(input, mask, results).  Mask convention: white (> 50 % grey) = fill, black = keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from .data import from_uint8
from .data.images import _to_mode
from .errors import DDPMError
from .progress import progress_bar
from .samplers import get_sampler
from .samplers.base import ModelPredictor
from .samplers.inpaint import repaint, repaint_nfe, sdedit, strength_to_steps
from .schedules import NoiseSchedule

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _open(path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"{what} '{path}' does not exist; give the path of a PNG (or JPEG, ...) file")
    try:
        with Image.open(path) as img:
            img.load()
            try:
                return ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                return img.copy()
    except (OSError, ValueError) as e:
        raise DDPMError(f"{what} '{path}' is not a readable image ({type(e).__name__}: {e})") from None


def _fit(img: Image.Image, size: Tuple[int, int], resample) -> Image.Image:
    """Scale to cover size = (H, W) and center-crop (as the training images were)."""
    h, w = size
    iw, ih = img.size
    scale = max(h / ih, w / iw)
    cw, ch = w / scale, h / scale
    box = ((iw - cw) / 2, (ih - ch) / 2, (iw + cw) / 2, (ih + ch) / 2)
    return img.resize((w, h), resample, box=box)


def _check_size(img: Image.Image, path, what: str, size: Tuple[int, int]) -> None:
    h, w = size
    if img.size != (w, h):
        raise DDPMError(f"{what} '{path}' is {img.size[0]}x{img.size[1]} pixels but the model's images are "
                        f"{w}x{h} (width x height); pass --resize to scale and center-crop it, or give a "
                        f"{w}x{h} file")


def load_picture(path, shape: Sequence[int], resize: bool = False, what: str = "--image") -> torch.Tensor:
    """An image file as the model's input: (C, H, W) float32 in [-1, 1] for shape = (C, H, W)."""
    c, h, w = shape
    img = _to_mode(_open(path, what), _MODES[c])
    if resize:
        img = _fit(img, (h, w), Image.Resampling.BICUBIC)
    _check_size(img, path, what, (h, w))
    arr = np.array(img, dtype=np.uint8)
    return from_uint8(arr if arr.ndim == 3 else arr[:, :, None])


def load_mask(path, size: Sequence[int], resize: bool = False, what: str = "--mask") -> torch.Tensor:
    """A mask file as (1, H, W) float32: 1 where the pixel is > 50 % grey (fill), 0 elsewhere (keep)."""
    h, w = size
    img = _to_mode(_open(path, what), "L")
    if resize:
        img = _fit(img, (h, w), Image.Resampling.NEAREST)
    _check_size(img, path, what, (h, w))
    mask = torch.from_numpy(np.array(img, dtype=np.uint8) > 127).float()[None]
    if not mask.any():
        raise DDPMError(f"{what} '{path}' has no white pixels, so there is nothing to fill "
                        "(white = fill, black = keep; invert the mask if you drew it the other way)")
    return mask


def _batches(n: int, batch_size: int):
    for b, start in enumerate(range(0, n, batch_size)):
        yield b, start, min(batch_size, n - start)


@torch.no_grad()
def inpaint(model, schedule: NoiseSchedule, image: torch.Tensor, mask: torch.Tensor, n: int = 4, *,
            prediction: str = "eps", clip_x0: Optional[float] = 1.0, labels: Optional[torch.Tensor] = None,
            steps: Optional[int] = 250, jump_length: int = 10, jump_n_sample: int = 10, variance: str = "beta",
            seed: int = 0, batch_size: int = 64, device=None, progress: bool = True) -> torch.Tensor:
    """``n`` fillings of the white region of ``mask`` (1, H, W) in ``image`` (C, H, W): (n, C, H, W) on the CPU.

    RePaint with ``steps`` respaced steps and resampling jumps; batch b starts from seed + b.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nfe = repaint_nfe(steps or schedule.num_timesteps, jump_length, jump_n_sample)
    n_batches = (n + batch_size - 1) // batch_size
    bar = progress_bar(progress, total=n_batches * nfe, desc=f"inpainting (RePaint, {nfe} steps)", leave=False)
    out = []
    try:
        for b, start, m in _batches(n, batch_size):
            gen = torch.Generator(device="cpu").manual_seed(seed + b)
            x_T = torch.randn((m, *image.shape), generator=gen).to(device)
            y = None if labels is None else labels[start:start + m].to(device)
            predict = ModelPredictor(model, schedule, prediction, y=y, clip_x0=clip_x0)
            x = repaint(predict, schedule, x_T, steps, x0_known=image.to(device).expand(m, *image.shape),
                        mask=mask.to(device)[None], generator=gen, callback=lambda *a: bar.update(1),
                        jump_length=jump_length, jump_n_sample=jump_n_sample, variance=variance)
            out.append(x.float().cpu())
    finally:
        bar.close()
    return torch.cat(out)


@torch.no_grad()
def img2img(model, schedule: NoiseSchedule, image: torch.Tensor, strength: float, n: int = 4, *,
            sampler: str = "ddim", steps: Optional[int] = 50, prediction: str = "eps",
            clip_x0: Optional[float] = 1.0, labels: Optional[torch.Tensor] = None, seed: int = 0,
            batch_size: int = 64, device=None, progress: bool = True, **options) -> torch.Tensor:
    """``n`` SDEdit variations of ``image`` (C, H, W) at ``strength``: (n, C, H, W) on the CPU.

    ``steps``: sampler steps from t0 = strength * T down to 0 (at most the n0 timesteps there).
    """
    fn = get_sampler(sampler)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n0 = strength_to_steps(strength, schedule.num_timesteps)
    total = 0 if n0 == 0 else (n0 if steps is None else min(steps, n0))
    n_batches = (n + batch_size - 1) // batch_size
    bar = progress_bar(progress and total > 0, total=n_batches * total, desc=f"img2img ({sampler}, {total} steps)",
                       leave=False)
    out = []
    try:
        for b, start, m in _batches(n, batch_size):
            gen = torch.Generator(device="cpu").manual_seed(seed + b)
            y = None if labels is None else labels[start:start + m].to(device)
            predict = ModelPredictor(model, schedule, prediction, y=y, clip_x0=clip_x0)
            x_in = image.to(device).expand(m, *image.shape).clone()
            x = sdedit(fn, predict, schedule, x_in, strength, steps, generator=gen,
                       callback=lambda *a: bar.update(1), **options)
            out.append(x.float().cpu())
    finally:
        bar.close()
    return torch.cat(out)


def comparison_row(image: torch.Tensor, results: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One row for :func:`ddpmlab.viz.save_grid`: input, mask (white = filled) if any, results: (k, C, H, W)."""
    c = image.shape[0]
    tiles = [image[None]]
    if mask is not None:
        m = (mask * 2 - 1).expand(c, *mask.shape[1:]).clone()
        if c == 4:
            m[3] = 1.0  # opaque alpha
        tiles.append(m[None])
    return torch.cat(tiles + [results])
