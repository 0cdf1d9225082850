"""Pictures in and out with Pillow: sample grids and single PNGs, input pictures and masks.

Inputs for editing (:mod:`ddpmlab.samplers.editing`: RePaint, SDEdit) are read with the
model's channels and checked for its size (an image is resized only when asked), from raster
formats only and never over Pillow's decompression-bomb limit (:func:`~ddpmlab.data.images.open_image`); the
side-by-side row is input, mask, results.  Mask convention: white (> 50 % grey) = fill,
black = keep.  Images are (C, H, W) or (B, C, H, W) in [-1, 1], written as 8-bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from ddpmlab.data import from_uint8, to_uint8
from ddpmlab.data.images import CHANNEL_MODES, ImageTooLarge, open_image, to_mode
from ddpmlab.errors import OPTION, OptionError, mention


def _open(path, option: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise OptionError(option, f"{OPTION} '{path}' does not exist; give the path of a PNG (or JPEG, ...) file")
    try:
        with open_image(path) as img:  # raster formats only, refused over the decompression-bomb limit
            img.load()
            try:
                return ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                return img.copy()
    except ImageTooLarge as e:
        raise OptionError(option, f"{OPTION} '{path}' is {e}; give a smaller picture") from None
    except (OSError, ValueError) as e:
        raise OptionError(option, f"{OPTION} '{path}' is not a readable image ({type(e).__name__}: {e})") from None


def _fit(img: Image.Image, size: Tuple[int, int], resample) -> Image.Image:
    """Scale to cover size = (H, W) and center-crop (as the training images were)."""
    h, w = size
    iw, ih = img.size
    scale = max(h / ih, w / iw)
    cw, ch = w / scale, h / scale
    box = ((iw - cw) / 2, (ih - ch) / 2, (iw + cw) / 2, (ih + ch) / 2)
    return img.resize((w, h), resample, box=box)


def _check_size(img: Image.Image, path, option: str, size: Tuple[int, int]) -> None:
    h, w = size
    if img.size != (w, h):
        raise OptionError(option, f"{OPTION} '{path}' is {img.size[0]}x{img.size[1]} pixels but the model's images "
                                  f"are {w}x{h} (width x height); use {mention('resize')} to scale and center-crop "
                                  f"it, or give a {w}x{h} file")


def load_picture(path, shape: Sequence[int], resize: bool = False) -> torch.Tensor:
    """An image file as the model's input: (C, H, W) float32 in [-1, 1] for shape = (C, H, W).

    A file that is missing, unreadable or (without ``resize``) of another size is an OptionError
    about 'image' (that names the option 'resize' as the fix of a size).
    """
    c, h, w = shape
    img = to_mode(_open(path, "image"), CHANNEL_MODES[c])
    if resize:
        img = _fit(img, (h, w), Image.Resampling.BICUBIC)
    _check_size(img, path, "image", (h, w))
    arr = np.array(img, dtype=np.uint8)
    return from_uint8(arr if arr.ndim == 3 else arr[:, :, None])


def load_mask(path, size: Sequence[int], resize: bool = False) -> torch.Tensor:
    """A mask file as (1, H, W) float32: 1 where the pixel is > 50 % grey (fill), 0 elsewhere (keep).
    A bad file is an OptionError about 'mask', as :func:`load_picture`'s about 'image'."""
    h, w = size
    img = to_mode(_open(path, "mask"), "L")
    if resize:
        img = _fit(img, (h, w), Image.Resampling.NEAREST)
    _check_size(img, path, "mask", (h, w))
    mask = torch.from_numpy(np.array(img, dtype=np.uint8) > 127).float()[None]
    if not mask.any():
        raise OptionError("mask", f"{OPTION} '{path}' has no white pixels, so there is nothing to fill "
                                  "(white = fill, black = keep; invert the mask if you drew it the other way)")
    return mask


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


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """images: (B, C, H, W) in [-1, 1] -> one uint8 array (H', W', C) with C in {1, 3, 4}."""
    arr = to_uint8(images)  # (B, H, W, C)
    b, h, w, c = arr.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255 if c != 4 else 0, dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = arr[k]
    return grid


def grid_image(images: torch.Tensor, nrow: Optional[int] = None, scale: int = 1) -> Image.Image:
    """A PIL image of :func:`make_grid`; ``scale`` enlarges small images (nearest)."""
    grid = make_grid(images, nrow)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[grid.shape[-1]]
    img = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(images: torch.Tensor, path, nrow: Optional[int] = None, scale: int = 1) -> Path:
    """Write a PNG grid of images in [-1, 1]; ``scale`` enlarges small images (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow, scale).save(path)
    return path


def save_images(images: torch.Tensor, folder, start: int = 0) -> list:
    """One PNG per image of (B, C, H, W) in [-1, 1]: folder/000000.png, 000001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images), start=start):
        path = folder / f"{i:06d}.png"
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
        paths.append(path)
    return paths
