"""Control images of a ControlNet (Zhang et al. 2023): computed from images by a detector, or read from a folder.

Control images are (B, C, H, W) in [0, 1], as diffusers' ControlNet pipelines feed them.  The detectors work in torch
on images in [-1, 1] (the data's scale), on their luminance (ITU-R BT.601 weights of RGB):

* ``edges``: Canny-like (Canny 1986): the Sobel gradient (kernels / 8, so a unit step has magnitude 1/2), kept where
  its magnitude reaches the threshold and is a maximum along the gradient's direction (one of eight): above the
  neighbour uphill and at least the one downhill, so a step's edge lies on its bright side, one pixel wide.  A
  white square on black gives exactly its border pixels.
* ``mask``: 1 where the luminance exceeds the threshold.
* ``scribble``: the edges of a random share of 4x4-pixel cells, thickened to 3 pixels (a 3x3 maximum): strokes a
  hand might draw along some of the edges.
* ``blur``: a Gaussian blur of every channel (separable, reflecting borders, radius 3 sigma).

A paired folder holds one control picture per training image, at the same path below ``control/`` as the image's
below ``images/`` (:class:`PairedControls`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ddpmlab.data import image_shape
from ddpmlab.data.images import CHANNEL_MODES, load_image, open_image, to_mode
from ddpmlab.errors import DataError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def luminance(x01: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W): the channel itself, or the BT.601 luminance of RGB(A)."""
    if x01.shape[1] < 3:
        return x01[:, :1]
    w = torch.tensor(LUMA, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01[:, :3] * w).sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of (B, C, H, W) convolved with a normalised Gaussian of std ``sigma`` pixels (borders reflected,
    or replicated where the image is smaller than the kernel's radius)."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype).to(x.device)
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    h = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(h, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def sobel(lum: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d/dx, d/dy) of (B, 1, H, W) by Sobel's 3x3 kernels / 8 (rows go down), borders replicated."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=lum.dtype, device=lum.device) / 8
    padded = F.pad(lum, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx.view(1, 1, 3, 3)), F.conv2d(padded, kx.t().reshape(1, 1, 3, 3))


# the eight directions (dx, dy) of sector k = round(angle / 45 degrees) mod 8, y downwards
_DIRECTIONS = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]


def _neighbours(mag: torch.Tensor) -> torch.Tensor:
    """(B, 8, H, W): the magnitude of each pixel's neighbour in each of the eight directions (0 outside)."""
    h, w = mag.shape[-2:]
    padded = F.pad(mag, (1, 1, 1, 1))
    return torch.cat([padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dx, dy in _DIRECTIONS], dim=1)


def edges(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Canny-like edges of images (B, C, H, W) in [-1, 1]: (B, 1, H, W) in {0, 1} (see the module's docstring)."""
    gx, gy = sobel(luminance((x + 1) / 2))
    mag = torch.sqrt(gx * gx + gy * gy)
    sector = torch.remainder(torch.round(torch.atan2(gy, gx) / (math.pi / 4)), 8).long()
    around = _neighbours(mag)
    uphill = around.gather(1, sector)
    downhill = around.gather(1, (sector + 4) % 8)
    return ((mag >= threshold) & (mag > 0) & (mag > uphill) & (mag >= downhill)).to(x.dtype)


def mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) in {0, 1}: 1 where the luminance of images in [-1, 1] (read in [0, 1]) exceeds ``threshold``."""
    return (luminance((x + 1) / 2) > threshold).to(x.dtype)


def scribble(x: torch.Tensor, threshold: float, keep: float, generator: Optional[torch.Generator] = None,
             cell: int = 4) -> torch.Tensor:
    """The edges of a random share ``keep`` of ``cell`` x ``cell`` cells, thickened by a 3x3 maximum: (B, 1, H, W)."""
    e = edges(x, threshold)
    b, _, h, w = e.shape
    device = generator.device if generator is not None else e.device
    cells = torch.rand(b, 1, -(-h // cell), -(-w // cell), generator=generator, device=device).to(e.device)
    chosen = (cells < keep).to(e.dtype).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    return F.max_pool2d(e * chosen[:, :, :h, :w], 3, stride=1, padding=1)


def as_channels(c: torch.Tensor, channels: int) -> torch.Tensor:
    """A control (B, k, H, W) in [0, 1] with ``channels`` channels: one repeated, or several to their luminance."""
    if c.shape[1] == channels:
        return c
    if c.shape[1] == 1:
        return c.expand(-1, channels, -1, -1).clone()
    lum = luminance(c)
    return lum if channels == 1 else lum.expand(-1, channels, -1, -1).clone()


def detector(cfg) -> Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]:
    """``controlnet.detector`` of ``cfg`` as a function (images (B, C, H, W) in [-1, 1], generator) -> controls
    (B, controlnet.control_channels or C, H, W) in [0, 1]."""
    c = cfg.controlnet
    channels = c.control_channels or image_shape(cfg)[0]
    kinds = {
        "edges": lambda x, g: edges(x, c.edge_threshold),
        "mask": lambda x, g: mask(x, c.mask_threshold),
        "scribble": lambda x, g: scribble(x, c.edge_threshold, c.scribble_keep, g),
        "blur": lambda x, g: gaussian_blur((x + 1) / 2, c.blur_sigma).clamp(0, 1),
    }
    if c.detector not in kinds:
        raise DataError(f"controlnet.detector: {c.detector!r} computes nothing; choose one of {', '.join(kinds)}")
    return lambda x, generator=None: as_channels(kinds[c.detector](x, generator), channels)


# ------------------------------------------------------------------------------ pictures


def control_folder(cfg) -> Path:
    """Where the control pictures of ``cfg``'s image folder are: controlnet.control_path, else control/ beside
    data.path (``data/images`` -> ``data/control``)."""
    c = cfg.controlnet
    root = Path(os.path.expanduser(str(cfg.data.path))).resolve()
    return Path(os.path.expanduser(c.control_path)) if c.control_path else root.parent / "control"


def _as_float(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


class PairedControls(torch.utils.data.Dataset):
    """An image folder with a control picture per image: ``ds[i] == (x, y, control)``, control (C, H, W) in [0, 1]
    read at the images' size with ``channels`` channels from the same path below ``control_root`` as the image's
    below the folder's root; an image without one is refused, naming it."""

    def __init__(self, images, control_root, channels: int):
        self.images, self.root = images, Path(control_root)
        self.is_image, self.sample_shape = True, images.sample_shape
        self.num_classes, self.class_names = images.num_classes, getattr(images, "class_names", [])
        paths = [self.root / os.path.relpath(f, images.root) for f in images.files]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"controlnet: {len(missing)} of {len(paths)} images have no control picture (e.g. "
                            f"'{missing[0]}'); put one of the same name at the same place below '{self.root}', or "
                            "choose a controlnet.detector")
        size = images.image_size
        self.controls = torch.stack([_as_float(load_image(str(p), size, channels)) for p in paths])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        x, y = self.images[index]
        return x, y, self.controls[index]


def read_control(path, shape: Sequence[int], say: Callable[[str], None] = print) -> torch.Tensor:
    """A control picture as (1, C, H, W) in [0, 1] for shape (C, H, W); a picture of another size is scaled and
    center-cropped to it, with a one-line note through ``say``."""
    c, h, w = shape
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--control '{path}' does not exist; give a control picture (PNG, JPEG, ...)")
    try:
        with open_image(path) as img:
            img = to_mode(ImageOps.exif_transpose(img), CHANNEL_MODES[c])
    except (OSError, ValueError) as e:
        raise DataError(f"--control '{path}' is not a readable picture ({type(e).__name__}: {e})") from None
    if img.size != (w, h):
        say(f"note: --control '{path}' is {img.size[0]}x{img.size[1]} pixels; scaled and center-cropped to {w}x{h}, "
            "the ControlNet's control size")
        img = ImageOps.fit(img, (w, h), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)
    return _as_float(arr if arr.ndim == 3 else arr[:, :, None])[None]
