"""``ddpm data shapes OUT``: the coloured-shapes set (:mod:`ddpmlab.data.shapes`) written as an image folder.

The folder, written whole or not at all (built in a hidden temporary folder beside OUT, then renamed)::

    OUT/large-blue-circle-bottom/00017.png   one sub-folder per class, so ``data.dataset=folder data.path=OUT``
    ...                                      reads label i for the i-th class (sorted names = class order)
    OUT/metadata.jsonl                       {"file_name": "large-blue-circle-bottom/00017.png", "text": "..."}:
                                             one caption per image (Hugging Face ImageFolder's convention)
    OUT/shapes.json                          what made it: size, seed, the attribute values, class names,
                                             the held-out classes (and whether the folder has them)

The loader reads only image files, so the two text files do not disturb it (``ddpm data check`` lists them
as ignored). With ``hold_out`` the held-out classes have no sub-folder: the folder's labels then skip them,
and a class is known by its name (:meth:`ShapesSpec.class_index`), not by its label.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ddpmlab.atomic import fsync_dir
from ddpmlab.data.shapes import (
    MIN_IMAGE_SIZE,
    ShapesSpec,
    balanced_labels,
    captions,
    draw_shapes,
    held_out_classes,
    jitters,
)
from ddpmlab.errors import DataError
from ddpmlab.progress import progress_bar

METADATA_FILE = "metadata.jsonl"
SPEC_FILE = "shapes.json"
CHUNK = 500  # images drawn at once


def _check_target(out: Path) -> None:
    if out.exists():
        raise DataError(f"shapes: '{out}' already exists; choose a new folder name or remove it first")
    if not out.parent.is_dir():
        raise DataError(f"shapes: the folder '{out.parent}' that should hold '{out.name}' does not exist; create it "
                        "first")


def _describe(spec: ShapesSpec, n: int, size: int, seed: int, held_out: list[int], hold_out: bool) -> dict:
    return {"generator": "ddpmlab.data.shapes", "format": 1, "n": n, "size": size, "seed": seed,
            "attributes": spec.to_dict(), "class_names": spec.class_names(),
            "held_out": [spec.class_names()[i] for i in held_out], "held_out_in_folder": not hold_out}


def _write_images(tmp: Path, spec: ShapesSpec, labels: np.ndarray, size: int, seed: int,
                  progress: bool) -> list[str]:
    """The PNGs under ``tmp``/<class name>/; returns each image's file name relative to ``tmp``."""
    names = spec.class_names()
    for i in np.unique(labels):
        (tmp / names[i]).mkdir()
    files = [f"{names[label]}/{k:05d}.png" for k, label in enumerate(labels)]
    jitter = jitters(len(labels), seed)  # as generate(spec, labels, size, seed) draws them, a chunk at a time
    bar = progress_bar(progress, total=len(labels), desc="shapes", unit="image")
    for start in range(0, len(labels), CHUNK):
        part = slice(start, start + CHUNK)
        images = draw_shapes([spec.attributes(i) for i in labels[part]], size, jitter[part])
        for k, image in zip(range(start, len(labels)), images):
            Image.fromarray(image, "RGB").save(tmp / files[k])
        bar.update(len(images))
    bar.close()
    return files


def write_shapes_folder(out, n: int = 6000, size: int = 32, seed: int = 0, spec: ShapesSpec = ShapesSpec(),
                        hold_out: bool = False, progress: bool = True) -> Path:
    """Write ``n`` images of ``spec``'s classes (every class equally often; without the held-out classes when
    ``hold_out``) to the new folder ``out`` as the module docstring shows; returns its path."""
    out = Path(os.path.expanduser(str(out)))
    _check_target(out)
    if int(size) < MIN_IMAGE_SIZE:
        raise DataError(f"shapes: image size {size} is too small; give at least {MIN_IMAGE_SIZE} (--size)")
    held_out = held_out_classes(spec)
    classes = spec.num_classes - (len(held_out) if hold_out else 0)
    if n < classes:
        raise DataError(f"shapes: {n} images cannot show all {classes} classes; ask for at least {classes} "
                        "(--n) or fewer classes")
    labels = balanced_labels(spec, n, seed, exclude=held_out if hold_out else ())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = _write_images(tmp, spec, labels, size, seed, progress)
        texts = captions(spec, labels, seed)
        lines = [json.dumps({"file_name": f, "text": t}) for f, t in zip(files, texts)]
        (tmp / METADATA_FILE).write_text("\n".join(lines) + "\n")
        about = _describe(spec, n, size, seed, held_out, hold_out)
        (tmp / SPEC_FILE).write_text(json.dumps(about, indent=1) + "\n")
        os.replace(tmp, out)  # the whole folder appears at once
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_shapes_spec(folder) -> tuple[ShapesSpec, dict]:
    """(the spec, the whole description) of a folder :func:`write_shapes_folder` wrote."""
    path = Path(folder) / SPEC_FILE
    try:
        about = json.loads(path.read_text())
        return ShapesSpec.of(**about["attributes"]), about
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{path}' cannot be read ({type(e).__name__}: {e}); is '{folder}' a folder written by "
                        "`ddpm data shapes`?") from None


def class_of_file(file_name: str, spec: ShapesSpec) -> int:
    """The class index of an image of the folder from its path (its sub-folder is the class name)."""
    return spec.class_index(Path(file_name).parent.name)

