"""Coloured shapes on black: a procedural data set with exact attributes, and captions for it.

Each image (RGB, ``size`` x ``size``, default 32) holds one shape on a pure black background, drawn without
anti-aliasing (a pixel takes the shape's colour when its centre lies inside the shape, else it stays black), so
every pixel is black or one palette colour. Four attributes make a class:

* **size**: ``large``, ``small``: the side of the shape's bounding box, :data:`SIZE_EXTENT` of the image side;
* **colour**: ``blue``, ``cyan``, ``green``, ``magenta``, ``red``, ``yellow``: the six corners of the RGB cube
  other than black and white (:data:`PALETTE`), at least 255 apart;
* **shape**: ``circle``, ``plus``, ``square``, ``triangle`` (pointing up), each filling a square bounding box;
* **position**: a 3x3 grid: ``top-left``, ``top``, ``top-right``, ``left``, ``centre``, ``right``,
  ``bottom-left``, ``bottom``, ``bottom-right`` (bounding-box centre at :data:`ROWS` x :data:`COLUMNS`).

Every image jitters its size by up to :data:`SIZE_JITTER` (relative) and its centre by up to
:data:`POSITION_JITTER` of the image side per axis, so the set is not a lookup table; shapes stay out of the
border that :func:`ddpmlab.evaluate.judges.border_brightness` reads. The default set has 2 x 6 x 4 x 9 = 432
classes.

**Class order.** A class's name is ``size-colour-shape-position`` (``large-red-circle-top-left``); class index i
is the i-th name in sorted order, which is the order an image folder's sub-folders get (labels 0, 1, ...): the
product of the sorted sizes, colours, shapes and positions, size varying slowest. :class:`ShapesSpec` chooses a
subset of each attribute's values.

**Held-out combinations** (:func:`held_out_classes`): every shape misses one colour (all its sizes and
positions), each shape a different colour, so a text-conditioned model can be asked for pairs it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ddpmlab.errors import DataError

SIZES = ("large", "small")
COLOURS = ("blue", "cyan", "green", "magenta", "red", "yellow")
SHAPES = ("circle", "plus", "square", "triangle")
ROWS = {"top": 0.28, "middle": 0.5, "bottom": 0.72}  # a row's centre, a fraction of the image height
COLUMNS = {"left": 0.28, "centre": 0.5, "right": 0.72}  # a column's centre, a fraction of the width
POSITIONS = tuple(sorted(
    "centre" if (r, c) == ("middle", "centre") else r if c == "centre" else c if r == "middle" else f"{r}-{c}"
    for r in ROWS for c in COLUMNS))
ATTRIBUTES = ("size", "colour", "shape", "position")  # the order of the words of a class name
PALETTE = {  # 8-bit RGB of each colour
    "blue": (0, 0, 255), "cyan": (0, 255, 255), "green": (0, 255, 0),
    "magenta": (255, 0, 255), "red": (255, 0, 0), "yellow": (255, 255, 0),
}
SIZE_EXTENT = {"large": 0.40, "small": 0.25}  # side of the bounding box / side of the image
SIZE_JITTER = 0.06  # the side is scaled by a uniform factor in [1 - this, 1 + this]
POSITION_JITTER = 0.015  # the centre moves by a uniform offset in [-this, this] x the image side, per axis
MIN_IMAGE_SIZE = 28  # below it a small circle (under 7 pixels across) is drawn nearly as a square
VALUES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
ROW_OF = {p: next((r for r in ROWS if p.startswith(r)), "middle") for p in POSITIONS}
COLUMN_OF = {p: next((c for c in COLUMNS if p.endswith(c)), "centre") for p in POSITIONS}
PLUS_ARM = 1 / 3  # the plus sign's arm width / its side


def position_name(row: str, column: str) -> str:
    """The position of grid cell (row, column): ``top-left``, ``top`` (top, centre), ``centre``, ..."""
    return next(p for p in POSITIONS if ROW_OF[p] == row and COLUMN_OF[p] == column)


@dataclass(frozen=True)
class ShapesSpec:
    """Which values of each attribute a set has (sorted tuples, a subset of :data:`VALUES`); classes are
    their product, in the order of the module docstring. ``ShapesSpec.of(colours=["red", "blue"])`` sorts."""

    sizes: tuple = SIZES
    colours: tuple = COLOURS
    shapes: tuple = SHAPES
    positions: tuple = POSITIONS

    def __post_init__(self):
        for f in fields(self):
            values, known = tuple(getattr(self, f.name)), VALUES[f.name[:-1]]
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise DataError(f"shapes {f.name}: {', '.join(map(str, unknown)) or 'none given'} - choose among "
                                f"{', '.join(known)}")
            if list(values) != sorted(set(values)):
                raise DataError(f"shapes {f.name}: {list(values)} must be sorted without repeats; "
                                "build the spec with ShapesSpec.of(...), which sorts")

    @classmethod
    def of(cls, sizes=None, colours=None, shapes=None, positions=None) -> "ShapesSpec":
        """A spec of these values (any order, repeats dropped; None: all of the attribute's values)."""
        given = {"sizes": sizes, "colours": colours, "shapes": shapes, "positions": positions}
        return cls(**{k: tuple(sorted(set(v))) for k, v in given.items() if v is not None})

    def values(self, attribute: str) -> tuple:
        return getattr(self, attribute + "s")

    @property
    def num_classes(self) -> int:
        return int(np.prod([len(self.values(a)) for a in ATTRIBUTES]))

    def attributes(self, index: int) -> dict:
        """Class ``index`` -> {"size": ..., "colour": ..., "shape": ..., "position": ...}."""
        if not 0 <= int(index) < self.num_classes:
            raise DataError(f"shapes class {index} does not exist: this set has classes 0..{self.num_classes - 1}")
        out, rest = {}, int(index)
        for a in reversed(ATTRIBUTES):  # the last attribute varies fastest
            rest, i = divmod(rest, len(self.values(a)))
            out[a] = self.values(a)[i]
        return {a: out[a] for a in ATTRIBUTES}

    def class_index(self, attributes: Union[Mapping[str, str], str]) -> int:
        """The class of an attribute dict or a class name (``large-red-circle-top-left``)."""
        attrs = parse_class_name(attributes) if isinstance(attributes, str) else attributes
        index = 0
        for a in ATTRIBUTES:
            values = self.values(a)
            if attrs.get(a) not in values:
                raise DataError(f"shapes {a} '{attrs.get(a)}' is not in this set; it has {', '.join(values)}")
            index = index * len(values) + values.index(attrs[a])
        return index

    def class_names(self) -> list[str]:
        """Every class's name, in class order (which is sorted order)."""
        return [class_name(self.attributes(i)) for i in range(self.num_classes)]

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def class_name(attributes: Mapping[str, str]) -> str:
    """{"size": "large", "colour": "red", ...} -> ``large-red-circle-top-left``."""
    return "-".join(attributes[a] for a in ATTRIBUTES)


def parse_class_name(name: str) -> dict:
    """``large-red-circle-top-left`` -> its attribute dict (DataError for a name of another form)."""
    parts = str(name).split("-", 3)
    attrs = dict(zip(ATTRIBUTES, parts))
    if len(parts) != 4 or any(attrs[a] not in VALUES[a] for a in ATTRIBUTES):
        raise DataError(f"'{name}' is not a shapes class name; it should read size-colour-shape-position, "
                        "e.g. large-red-circle-top-left")
    return attrs


def held_out_classes(spec: ShapesSpec) -> list[int]:
    """Classes to leave out of a text-to-image training set: shape i of n_s with colour i * n_c // n_s + 1
    (mod n_c) of n_c, at every size and position; none where the spec has one shape or one colour."""
    shapes, colours = spec.shapes, spec.colours
    if len(shapes) < 2 or len(colours) < 2:
        return []
    pairs = {(s, colours[(i * len(colours) // len(shapes) + 1) % len(colours)]) for i, s in enumerate(shapes)}
    return [i for i in range(spec.num_classes)
            if (spec.attributes(i)["shape"], spec.attributes(i)["colour"]) in pairs]


# ------------------------------------------------------------------------------ drawing


def shape_mask(shape: str, cx, cy, r, size: int) -> np.ndarray:
    """Pixels of a ``size`` x ``size`` grid whose centres lie inside ``shape``: bool (..., size, size).

    ``cx``, ``cy``: the bounding box's centre, ``r``: half its side, in pixels (pixel (i, j) has its centre at
    x = j + 0.5, y = i + 0.5); arrays of one shape (...) draw many at once. The triangle points up, its base the
    box's bottom side; the plus sign's arms are :data:`PLUS_ARM` of its side wide.
    """
    c = np.arange(size) + 0.5
    cx, cy, r = (np.asarray(v, dtype=np.float64)[..., None, None] for v in (cx, cy, r))
    dx, dy = c - cx, c[:, None] - cy
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":
        return (ay <= r) & (ax <= (dy + r) / 2)
    if shape == "plus":
        arm = r * PLUS_ARM
        return ((ax <= r) & (ay <= arm)) | ((ax <= arm) & (ay <= r))
    raise DataError(f"unknown shape '{shape}'; choose among {', '.join(SHAPES)}")


def placement(attributes: Mapping[str, str], size: int, jitter: Sequence[float] = (0.0, 0.0, 0.0)):
    """(cx, cy, r) in pixels of a shape with these attributes; ``jitter`` (3,) in [-1, 1] scales the
    :data:`POSITION_JITTER` of x and y and the :data:`SIZE_JITTER`."""
    p = attributes["position"]
    cx = (COLUMNS[COLUMN_OF[p]] + POSITION_JITTER * jitter[0]) * size
    cy = (ROWS[ROW_OF[p]] + POSITION_JITTER * jitter[1]) * size
    r = SIZE_EXTENT[attributes["size"]] * (1 + SIZE_JITTER * jitter[2]) * size / 2
    return cx, cy, r


def draw_shapes(attributes: Sequence[Mapping[str, str]], size: int = 32,
                jitter: Optional[np.ndarray] = None) -> np.ndarray:
    """Images of shapes with these attributes: uint8 (N, size, size, 3); ``jitter`` (N, 3) in [-1, 1] (None:
    every shape at its nominal place and size)."""
    if int(size) < MIN_IMAGE_SIZE:
        raise DataError(f"shapes image size {size} is too small: at least {MIN_IMAGE_SIZE} pixels")
    n = len(attributes)
    jitter = np.zeros((n, 3)) if jitter is None else np.asarray(jitter, dtype=np.float64)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    places = np.array([placement(a, size, j) for a, j in zip(attributes, jitter)]).reshape(n, 3)
    for shape in SHAPES:
        idx = np.array([i for i, a in enumerate(attributes) if a["shape"] == shape], dtype=np.int64)
        if len(idx):
            mask = shape_mask(shape, places[idx, 0], places[idx, 1], places[idx, 2], size)
            colours = np.array([PALETTE[attributes[i]["colour"]] for i in idx], dtype=np.uint8)
            out[idx] = mask[..., None] * colours[:, None, None, :]
    return out


def balanced_labels(spec: ShapesSpec, n: int, seed: int = 0, exclude: Sequence[int] = ()) -> np.ndarray:
    """``n`` class indices, every class of ``spec`` (but ``exclude``) equally often (+-1), shuffled by ``seed``."""
    classes = np.setdiff1d(np.arange(spec.num_classes), np.asarray(exclude, dtype=np.int64))
    rng = np.random.default_rng([seed, 1])
    return rng.permutation(np.resize(rng.permutation(classes), n))


def jitters(n: int, seed: int = 0) -> np.ndarray:
    """The jitter (N, 3) in [-1, 1] of images 0..n-1 of a set drawn with ``seed`` (x, y, size; :func:`placement`)."""
    return np.random.default_rng([seed, 2]).uniform(-1.0, 1.0, size=(n, 3))


def generate(spec: ShapesSpec, labels: Sequence[int], size: int = 32, seed: int = 0) -> np.ndarray:
    """Images of classes ``labels`` (N,): uint8 (N, size, size, 3); the same ``seed`` gives the same images."""
    labels = np.asarray(labels, dtype=np.int64)
    return draw_shapes([spec.attributes(i) for i in labels], size, jitters(len(labels), seed))


# ------------------------------------------------------------------------------ captions

SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little", "tiny")}
SHAPE_WORDS = {"circle": ("circle", "disc", "round dot"), "plus": ("plus sign", "cross", "plus"),
               "square": ("square", "block", "square tile"), "triangle": ("triangle", "triangle shape")}
ROW_WORDS = {"top": ("top", "upper"), "middle": ("middle",), "bottom": ("bottom", "lower")}
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "{label}: {size} {colour} {shape}",
    "a {colour} {shape}, {size}, {where}",
    "{where}, a {size} {shape} in {colour}",
    "{size} {colour} {shape} on black, {where}",
)


def _where(position: str, rng: np.random.Generator) -> tuple[str, str]:
    """(a phrase, a label) for a position: ("in the upper left corner", "top-left"), ("in the middle", "centre")."""
    row, col = ROW_OF[position], COLUMN_OF[position]
    if position == "centre":
        word = ("centre", "middle")[rng.integers(2)]
        return f"{('at', 'in')[rng.integers(2)]} the {word}", word
    if col == "centre":
        other = ROW_WORDS[row][1]  # upper, lower
        return (f"at the {row}", f"at the {row} centre", f"in the {other} middle")[rng.integers(3)], \
            (row, f"{row} centre")[rng.integers(2)]
    if row == "middle":
        return (f"on the {col}", f"in the middle {col}")[rng.integers(2)], f"{col} side"
    word = ROW_WORDS[row][rng.integers(len(ROW_WORDS[row]))]
    corner = f"{word} {col}"
    return (f"at the {corner}", f"in the {corner} corner")[rng.integers(2)], (corner, f"{word}-{col}")[rng.integers(2)]


def caption(attributes: Mapping[str, str], rng: np.random.Generator) -> str:
    """One wording of a class, drawn with ``rng``: "a small red circle at the top left",
    "top-left: little red disc", ... (every wording names all four attributes)."""
    where, label = _where(attributes["position"], rng)
    sizes, shapes = SIZE_WORDS[attributes["size"]], SHAPE_WORDS[attributes["shape"]]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(size=sizes[rng.integers(len(sizes))], colour=attributes["colour"],
                           shape=shapes[rng.integers(len(shapes))], where=where, label=label)


def captions(spec: ShapesSpec, labels: Sequence[int], seed: int = 0) -> list[str]:
    """One caption per label, the wordings drawn from ``seed``."""
    rng = np.random.default_rng([seed, 3])
    return [caption(spec.attributes(int(i)), rng) for i in labels]
