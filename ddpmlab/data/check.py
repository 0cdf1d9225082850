"""``ddpm data check DIR``: scan an image folder as training would, and report without training.

Every image is decoded, EXIF-rotated, converted and resized exactly as
:class:`~ddpmlab.data.images.ImageFolderDataset` does; the report lists the usable
images (per class), the images that will be upscaled because they are smaller than the
target size, the files ignored for their extension, and every skipped file with its reason.  A folder with
captions (:mod:`ddpmlab.data.captions`) gets their count, the images without one and the longest caption in
tokens of a word-level tokenizer built from them, as a text run's own is (:mod:`ddpmlab.data.tokenizer`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Collection, Sequence

from ddpmlab.data.captions import METADATA_FILE, caption_files, folder_captions
from ddpmlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    is_hidden,
    open_image,
    skip_report,
)
from ddpmlab.data.tokenizer import CaptionTokenizer
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


def _non_images(root: str, captions: Collection[str] = ()) -> list[str]:
    """Files below ``root`` that the scan ignores because of their extension (hidden ones and the caption
    files ``captions`` excluded)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not is_hidden(f) and not f.lower().endswith(IMAGE_EXTENSIONS)]
    return [f for f in found if f not in captions]


def caption_lines(root: str, files: Sequence[str]) -> list[str]:
    """The report's lines on the captions of ``files`` (the usable images of ``root``); none without captions.
    A caption file that cannot be read raises its one-line DataError."""
    found, source, unmatched = folder_captions(root, files)
    if not source:
        return []
    captioned = [c for c in found if c is not None]
    texts = [t for c in captioned for t in c]
    lines = [f"  captions: {len(texts)} from {source} for {len(captioned)} of {len(files)} images"
             f" ({min(map(len, captioned), default=0)}-{max(map(len, captioned), default=0)} an image)"]
    missing = [f for f, c in zip(files, found) if c is None]
    if missing:
        eg = ", ".join(Path(p).name for p in missing[:3])
        lines.append(f"  without a caption: {len(missing)} (skipped by text runs), e.g. {eg}")
    empty = sum(t == "" for t in texts)
    if empty:
        lines.append(f"  empty captions: {empty} (the unconditional prompt)")
    if unmatched:
        lines.append(f"  {METADATA_FILE} names {unmatched} file(s) that are not usable images of the folder")
    if texts:
        counts = CaptionTokenizer.train(texts, max_length=2).count(texts)
        k = max(range(len(texts)), key=counts.__getitem__)
        shown = texts[k] if len(texts[k]) <= 60 else texts[k][:57] + "..."
        lines.append(f"  longest caption: {counts[k]} tokens (words and punctuation, [BOS] and [EOS] included): "
                     f"'{shown}'")
    return lines


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
    try:
        captions = caption_lines(ds.root, ds.files)
    except DataError as e:
        say(f"  {e}")
        say("unreadable captions: training with text (text.encoder) on this folder would stop with this error")
        return 1
    for line in captions:
        say(line)
    ignored = _non_images(ds.root, caption_files(ds.root, ds.files))
    if ignored:
        eg = ", ".join(Path(p).name for p in ignored[:3])
        say(f"  ignored: {len(ignored)} file(s) without an image extension ({', '.join(IMAGE_EXTENSIONS)}), "
            f"e.g. {eg}")
    if ds.skipped:
        listing = skip_report(ds.skipped, limit, indent="    ")
        say(f"  skipped {len(ds.skipped)} (not used for training):\n{listing}")
    say(f"ok: {len(ds)} usable image{'s' if len(ds) != 1 else ''}")
    return 0
