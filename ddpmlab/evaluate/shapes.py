"""An exact scorer for the coloured-shapes set (:mod:`ddpmlab.data.shapes`): which attributes an image shows.

It reads an image as the set draws one, with no learned part:

* **foreground**: the pixels whose brightest channel is at least :data:`FOREGROUND_LEVEL` (the palette colours
  have a full channel; black has none);
* **clean** background: every pixel farther than :func:`margin` pixels from the foreground has its brightest
  channel below 20/255 (:data:`~ddpmlab.evaluate.judges.CLEAN_LEVEL`), and that background is at least half of
  the image (an image that is all "foreground", such as a light grey one, is not clean);
* a shape is **found** when the foreground's bounding box spans :data:`MIN_EXTENT` to :data:`MAX_EXTENT` of the
  image side (pure noise, a bright background, an empty image: nothing found, every attribute wrong);
* **shape**: the shape whose template (:func:`~ddpmlab.data.shapes.shape_mask`) overlaps the foreground best,
  with IoU at least :data:`MIN_IOU`; each shape's template is fitted to the foreground's area and centroid
  (moment matching), then moved by :data:`FIT_OFFSETS` of centre and half-side for the best IoU;
* **colour**: the palette colour nearest to the foreground's mean colour, within :data:`COLOUR_TOLERANCE`;
* **size**: the size whose nominal side is nearest (in log scale) to the best template's side;
* **position**: the grid row and column nearest to the best template's centre.

The images the set draws score right on every attribute (tests/test_shapes.py: 2,000 of them, 100 %).

    >>> scores = score_shapes(x, labels, spec)    # x (N, 3, H, W) in [-1, 1]; labels: class indices of spec
    >>> shape_shares(scores)                      # {"clean": 0.97, "shape": ..., "all": ...}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ddpmlab.data.shapes import (
    ATTRIBUTES,
    MIN_IMAGE_SIZE,
    COLUMNS,
    PALETTE,
    PLUS_ARM,
    ROWS,
    SHAPES,
    SIZE_EXTENT,
    VALUES,
    ShapesSpec,
    position_name,
    shape_mask,
)
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.judges import CLEAN_LEVEL

FOREGROUND_LEVEL = 0.5  # a pixel is the shape's when its brightest channel reaches this ([0, 1] scale)
MIN_EXTENT, MAX_EXTENT = 0.15, 0.5  # a found shape's bounding box side, as a fraction of the image side
MIN_IOU = 0.75  # a shape is recognised when its best template covers the foreground at least this well
COLOUR_TOLERANCE = 0.35  # the largest distance (RGB, [0, 1] scale) of the mean colour to a palette colour
FIT_OFFSETS = np.array(list(itertools.product((-0.25, 0.0, 0.25), repeat=3))).T  # (dx, dy, dr) pixels tried
FIT_SIZE = 64  # larger images are fitted at this size (their foreground area-scaled)
FIT_PIXELS = 2 ** 22  # template pixels drawn at once (memory)
SCORES = ("clean",) + ATTRIBUTES + ("all",)
_PALETTE = torch.tensor([PALETTE[c] for c in VALUES["colour"]], dtype=torch.float32) / 255


def margin(size: int) -> int:
    """How far (pixels) around the foreground its soft edge may reach: 1 per 16 pixels of side, at least 1."""
    return max(1, round(size / 16))


@dataclass
class ShapeReadings:
    """What each of N images shows: indices into :data:`~ddpmlab.data.shapes.VALUES` (-1: none) per attribute,
    ``clean`` (N,) bool, ``iou`` (N,) the best template's IoU, ``colour_rgb`` (N, 3) the foreground's mean."""

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    position: np.ndarray
    clean: np.ndarray
    iou: np.ndarray
    colour_rgb: np.ndarray

    def attributes(self, i: int) -> dict:
        """Image ``i``'s readings by name ({"size": "small", ..., "position": None} where none was read)."""
        return {a: (VALUES[a][getattr(self, a)[i]] if getattr(self, a)[i] >= 0 else None) for a in ATTRIBUTES}


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise DDPMError(f"the shapes scorer reads square RGB images (N, 3, S, S), got shape {tuple(x.shape)}")
    if x.shape[-1] < MIN_IMAGE_SIZE:
        raise DDPMError(f"the shapes scorer reads images of at least {MIN_IMAGE_SIZE} pixels a side (smaller ones "
                        f"cannot tell a small circle from a small square), got {x.shape[-1]}")


def _clean(v: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """v (N, H, W) brightest channel, fg (N, H, W) bool -> (N,) bool: the background is black and most of it."""
    k = margin(v.shape[-1])
    near = fg[:, None].float()
    for size, pad in (((2 * k + 1, 1), (k, 0)), ((1, 2 * k + 1), (0, k))):  # a square dilation, one axis at a time
        near = F.max_pool2d(near, size, stride=1, padding=pad)
    near = near[:, 0] > 0
    dark = v.masked_fill(near, 0).flatten(1).amax(1) < CLEAN_LEVEL
    return dark & ((~near).flatten(1).sum(1) >= v[0].numel() / 2)


def _boxes(fg: np.ndarray) -> np.ndarray:
    """fg (N, S, S) bool -> (N, 4) int: x0, y0, x1, y1 (inclusive) of the foreground; -1 where it is empty."""
    rows, cols = fg.any(2), fg.any(1)
    s = fg.shape[-1]
    box = np.stack([cols.argmax(1), rows.argmax(1), s - 1 - cols[:, ::-1].argmax(1),
                    s - 1 - rows[:, ::-1].argmax(1)], 1)
    box[~rows.any(1)] = -1
    return box


AREA_PER_R2 = {"circle": np.pi, "plus": 4 * (1 - (1 - PLUS_ARM) ** 2), "square": 4.0, "triangle": 2.0}  # area / r^2
CENTROID_BELOW = {"circle": 0.0, "plus": 0.0, "square": 0.0, "triangle": 1 / 3}  # (centroid - box centre) / r


def _fit_shapes(fg: np.ndarray, box: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Each shape's best template for the foreground fg (N, S, S): (IoU (N, len(SHAPES)), its (cx, cy, r) in
    pixels (N, len(SHAPES), 3)). The templates tried: the one with the foreground's area and centroid, moved by
    :data:`FIT_OFFSETS`, drawn in a ``w`` x ``w`` window of the image at the bounding box's corner."""
    n = fg.shape[0]
    padded = np.pad(fg, ((0, 0), (0, w), (0, w)))
    rows = box[:, 1, None] + np.arange(w)
    cols = box[:, 0, None] + np.arange(w)
    win = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]  # (N, 1, w, w)
    area = win.sum((2, 3))  # (N, 1)
    centre = np.arange(w) + 0.5
    mx = (win.sum(2) * centre).sum(2) / area  # (N, 1): the centroid in the window
    my = (win.sum(3) * centre).sum(2) / area
    iou, params = np.zeros((n, len(SHAPES))), np.zeros((n, len(SHAPES), 3))
    for j, shape in enumerate(SHAPES):
        r = np.sqrt(area / AREA_PER_R2[shape]) + FIT_OFFSETS[2]  # (N, T)
        cx, cy = mx + FIT_OFFSETS[0], my - CENTROID_BELOW[shape] * r + FIT_OFFSETS[1]
        t = shape_mask(shape, cx, cy, r, w)  # (N, T, w, w)
        inter = (t & win).sum((2, 3))
        fit = inter / np.maximum(t.sum((2, 3)) + area - inter, 1)
        k = fit.argmax(1)
        iou[:, j] = fit[np.arange(n), k]
        params[:, j] = np.stack([cx[np.arange(n), k] + box[:, 0], cy[np.arange(n), k] + box[:, 1],
                                 r[np.arange(n), k]], 1)
    return iou, params


def _nearest(value: np.ndarray, centres: Sequence[float]) -> np.ndarray:
    return np.abs(value[:, None] - np.asarray(centres)[None]).argmin(1)


def _positions(cx: np.ndarray, cy: np.ndarray, s: int) -> np.ndarray:
    """The index in POSITIONS of the grid cell nearest to each centre (cx, cy) (pixels) of an S x S image."""
    row = _nearest(cy / s, list(ROWS.values()))
    col = _nearest(cx / s, list(COLUMNS.values()))
    names = [position_name(list(ROWS)[i], list(COLUMNS)[j]) for i, j in zip(row, col)]
    return np.array([VALUES["position"].index(p) for p in names], dtype=np.int64)


def _colours(v: torch.Tensor, fg: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """v (N, 3, S, S) in [0, 1] -> (palette index or -1 (N,), mean foreground colour (N, 3))."""
    count = fg.flatten(1).sum(1).clamp(min=1)[:, None]
    mean = (v * fg[:, None]).flatten(2).sum(2) / count
    dist = torch.cdist(mean, _PALETTE)
    d, idx = dist.min(1)
    return torch.where(d <= COLOUR_TOLERANCE, idx, -1).numpy(), mean.numpy()


def _read_geometry(fg: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fg (N, S, S) bool -> (shape, size, position indices (N,) each, -1 where none; best IoU (N,)).

    Images larger than :data:`FIT_SIZE` are read from their foreground area-scaled to that size."""
    n, s = fg.shape[0], fg.shape[-1]
    if s > FIT_SIZE:
        fg, s = F.interpolate(fg[:, None].float(), size=(FIT_SIZE, FIT_SIZE), mode="area")[:, 0] >= 0.5, FIT_SIZE
    fg = fg.numpy()
    box = _boxes(fg)
    extent = (np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) + 1) / s
    found = (box[:, 0] >= 0) & (extent >= MIN_EXTENT) & (extent <= MAX_EXTENT)
    shape, size, position = (np.full(n, -1, dtype=np.int64) for _ in range(3))
    iou = np.zeros(n)
    if not found.any():
        return shape, size, position, iou
    w = int(np.ceil(MAX_EXTENT * s)) + 2
    chunk = max(1, FIT_PIXELS // (FIT_OFFSETS.shape[1] * w * w))  # images fitted at once
    sel = np.flatnonzero(found)
    parts = [_fit_shapes(fg[sel[i:i + chunk]], box[sel[i:i + chunk]], w) for i in range(0, len(sel), chunk)]
    fits, params = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    best = fits.argmax(1)
    cx, cy, r = params[np.arange(len(best)), best].T  # the best template's place and half-side
    iou[found] = fits.max(1)
    shape[found] = np.where(iou[found] >= MIN_IOU, best, -1)
    size[found] = _nearest(np.log(2 * r / s), np.log([SIZE_EXTENT[name] for name in VALUES["size"]]))
    position[found] = _positions(cx, cy, s)
    return shape, size, position, iou


@torch.no_grad()
def read_shapes(x: torch.Tensor) -> ShapeReadings:
    """What the images x (N, 3, S, S) in [-1, 1] show (see the module docstring)."""
    _check_images(x)
    v = ((x.detach().to("cpu", torch.float32) + 1) / 2).clamp(0, 1)
    bright = v.amax(1)
    fg = bright >= FOREGROUND_LEVEL
    shape, size, position, iou = _read_geometry(fg)
    colour, rgb = _colours(v, fg)
    return ShapeReadings(shape=shape, colour=np.where(size >= 0, colour, -1), size=size, position=position,
                         clean=_clean(bright, fg).numpy(), iou=iou, colour_rgb=rgb)


Targets = Union[Sequence[int], torch.Tensor, np.ndarray, Sequence[Mapping[str, str]]]


def _target_indices(targets: Targets, spec: ShapesSpec, n: int) -> dict:
    """{attribute: (N,) index into VALUES[attribute]} of class indices of ``spec`` or attribute dicts."""
    items = targets.tolist() if isinstance(targets, (torch.Tensor, np.ndarray)) else list(targets)
    if len(items) != n:
        raise DDPMError(f"the shapes scorer got {n} images but {len(items)} targets; give one class per image")
    attrs = [t if isinstance(t, Mapping) else spec.attributes(int(t)) for t in items]
    return {a: np.array([VALUES[a].index(t[a]) for t in attrs], dtype=np.int64) for a in ATTRIBUTES}


def score_shapes(x: torch.Tensor, targets: Targets, spec: ShapesSpec = ShapesSpec()) -> dict[str, torch.Tensor]:
    """Per image whether it shows what it should: {"clean", "size", "colour", "shape", "position", "all"}, each
    (N,) bool; ``x`` (N, 3, S, S) in [-1, 1], ``targets`` the class indices (of ``spec``) or attribute dicts.
    "all" is a clean background with every attribute right."""
    readings = read_shapes(x)
    want = _target_indices(targets, spec, len(x))
    out = {"clean": torch.from_numpy(readings.clean)}
    for a in ATTRIBUTES:
        out[a] = torch.from_numpy(getattr(readings, a) == want[a])
    out["all"] = out["clean"] & torch.stack([out[a] for a in ATTRIBUTES]).all(0)
    return {k: out[k] for k in SCORES}


def shape_shares(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The fraction of images right on each score of :func:`score_shapes`."""
    return {k: float(v.float().mean()) for k, v in scores.items()}
