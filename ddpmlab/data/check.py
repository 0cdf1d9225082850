"""``ddpm data check DIR``: scan an image folder as training would, and report without training.

Every image is decoded, EXIF-rotated, converted and resized exactly as
:class:`~ddpmlab.data.images.ImageFolderDataset` does; the report lists the usable
images (per class), the images that will be upscaled because they are smaller than the
target size, the files ignored for their extension, and every skipped file with its reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

from ddpmlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    is_hidden,
    open_image,
    skip_report,
)
from ddpmlab.errors import DataError

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height


def displayed_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as shown, i.e. after its EXIF rotation; reads only the header."""
    with open_image(path) as im:
        w, h = im.size
        try:
            turned = im.getexif().get(_ORIENTATION) in (5, 6, 7, 8)
        except Exception:  # noqa: BLE001 - a broken EXIF block: the decoder keeps the stored pixels too
            turned = False
    return (h, w) if turned else (w, h)


def _non_images(root: str) -> list[str]:
    """Files below ``root`` that the scan ignores because of their extension (hidden ones excluded)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not is_hidden(f) and not f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def check_folder(root, image_size: Sequence[int] = (32, 32), channels: int = 3, limit: int = 0,
                 say: Callable[[str], None] = print) -> int:
    """Print the report for ``root``; return 0 when at least one image is usable, else 1.

    A folder that does not exist or holds no image files at all raises :class:`DataError`.
    ``limit`` caps the list of skipped files (0: all).
    """
    h, w = int(image_size[0]), int(image_size[1])
    say(f"data check: {root} (image size {h}x{w}, {channels} channel{'s' if channels > 1 else ''})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = ImageFolderDataset(root, (h, w), channels, cache=False)
        except DataError as e:
            if not hasattr(e, "skipped"):
                raise
            say(f"  usable: none of {len(e.skipped)} image files")
            say(f"  skipped {len(e.skipped)}:\n{skip_report(e.skipped, limit, indent='    ')}")
            say("no usable images: training on this folder would stop with an error")
            return 1
    for note in caught:
        if "skipped" not in str(note.message):  # the skip list is printed below, in full
            say(f"  note: {note.message}")
    total = len(ds) + len(ds.skipped)
    classes = ""
    if ds.class_names:
        counts = [int((ds.labels == i).sum()) for i in range(ds.num_classes)]
        classes = f" in {ds.num_classes} classes: " + ", ".join(f"{c} {k}" for c, k in zip(ds.class_names, counts))
    say(f"  usable: {len(ds)} of {total} image files{classes}")
    small = [(p, s) for p in ds.files for s in [displayed_size(p)] if s[0] < w or s[1] < h]
    if small:
        eg = ", ".join(f"{Path(p).name} {sw}x{sh}" for p, (sw, sh) in small[:3])
        say(f"  upscaled: {len(small)} smaller than {w}x{h} (width x height), e.g. {eg}")
    ignored = _non_images(ds.root)
    if ignored:
        eg = ", ".join(Path(p).name for p in ignored[:3])
        say(f"  ignored: {len(ignored)} file(s) without an image extension ({', '.join(IMAGE_EXTENSIONS)}), "
            f"e.g. {eg}")
    if ds.skipped:
        listing = skip_report(ds.skipped, limit, indent="    ")
        say(f"  skipped {len(ds.skipped)} (not used for training):\n{listing}")
    say(f"ok: {len(ds)} usable image{'s' if len(ds) != 1 else ''}")
    return 0
