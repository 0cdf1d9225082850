"""Captioned image folders: an image folder (:mod:`ddpmlab.data.images`) whose images each have captions.

Where the captions are, the first that the folder has:

* ``metadata.jsonl`` in the folder (Hugging Face ImageFolder's convention, which diffusers'
  ``train_text_to_image`` reads): one JSON object a line, ``{"file_name": "sub/a.png", "text": "..."}``, the
  path relative to the folder; ``text`` is a caption or a list of captions; several lines naming one image add
  up. Class sub-folders stay classes (``ddpm data shapes`` writes such a folder), so a class folder with a
  ``metadata.jsonl`` is read as captioned data with its labels.
* a ``.txt`` file beside an image, of the same name (``a.png`` -> ``a.txt``): each non-blank line is one
  caption; a blank file is one empty caption.

The rules of bad input:

* an image without a caption (not in ``metadata.jsonl``, or no ``.txt``; ``"text": []``) is **skipped**: the
  images skipped so are counted in one warning line (``ddpm data check DIR`` lists them); a folder where no
  image has a caption is an error;
* an **empty caption is allowed**: it is the unconditional prompt of classifier-free guidance (the caption that
  caption dropout puts in), so an image with only an empty caption trains the unconditional model;
* a caption file that is not UTF-8, a line of ``metadata.jsonl`` that is not a JSON object with ``file_name``
  and ``text`` (a caption or a list of them): a one-line error naming the file and the line.

An image of several captions shows one of them per training step, drawn from (seed, training step, the image's
index) alone (:func:`draw_captions`): a resumed run or another number of processes draws the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ddpmlab.data.images import ImageFolderDataset
from ddpmlab.errors import DataError

METADATA_FILE = "metadata.jsonl"
CAPTION_EXTENSION = ".txt"
Captions = tuple  # one image's captions: a tuple of str


def _decode_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped); one-line DataError naming the line
    that is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"captions: cannot read '{path}' ({e.strerror or e}); check its permissions") from None
    lines = raw.split(b"\n")
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"captions: '{path}' line {n} is not UTF-8 text (byte {line[e.start]:#04x} at column "
                            f"{e.start + 1}); save the file as UTF-8") from None
    return out


def _entry(line: str, path: Path, n: int) -> tuple[str, Captions]:
    """(file_name, captions) of one line of metadata.jsonl."""
    where = f"captions: '{path}' line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON ({e.msg} at column {e.colno}); write one JSON object a line, "
                        '{"file_name": "a.png", "text": "a caption"}') from None
    if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
        raise DataError(f"{where} has no \"file_name\" (a path relative to the folder); write one JSON object a "
                        'line, {"file_name": "a.png", "text": "a caption"}')
    if "text" not in obj:
        raise DataError(f"{where} has no \"text\" (its keys: {', '.join(map(str, obj))}); write the caption "
                        "under \"text\"")
    text = obj["text"]
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: \"text\" must be a caption or a list of captions (strings), got "
                        f"{json.dumps(text)[:60]}")
    return os.path.normpath(obj["file_name"]), tuple(texts)


def read_metadata(root) -> dict[str, Captions]:
    """{file name relative to ``root`` (normalised): its captions} of ``root``/metadata.jsonl, lines in order."""
    path = Path(root) / METADATA_FILE
    out: dict[str, Captions] = {}
    for n, line in enumerate(_decode_lines(path), start=1):
        if line.strip():
            name, texts = _entry(line, path, n)
            out[name] = out.get(name, ()) + texts
    return out


def read_txt_captions(image: str) -> Optional[Captions]:
    """The captions of the ``.txt`` beside ``image`` (each non-blank line; a blank file: one empty caption),
    or None when there is none."""
    path = Path(image).with_suffix(CAPTION_EXTENSION)
    if not path.is_file():
        return None
    lines = [line.strip() for line in _decode_lines(path)]
    return tuple(line for line in lines if line) or ("",)


def caption_source(root, files: Sequence[str]) -> Optional[str]:
    """Where the captions of ``files`` (images below ``root``) are: ``metadata.jsonl`` in ``root``, ``.txt``
    (a caption file beside one of them at least), or None."""
    if (Path(root) / METADATA_FILE).is_file():
        return METADATA_FILE
    if any(Path(f).with_suffix(CAPTION_EXTENSION).is_file() for f in files):
        return CAPTION_EXTENSION
    return None


def caption_files(root, files: Sequence[str]) -> set[str]:
    """The caption files of ``files`` that exist: ``root``/metadata.jsonl, or each image's ``.txt``."""
    source = caption_source(root, files)
    if source == METADATA_FILE:
        return {str(Path(root) / METADATA_FILE)}
    found = (str(Path(f).with_suffix(CAPTION_EXTENSION)) for f in files)
    return {f for f in found if os.path.isfile(f)} if source else set()


def folder_captions(root, files: Sequence[str], table: Optional[dict] = None
                    ) -> tuple[list[Optional[Captions]], str, int]:
    """(the captions of each of ``files`` (None: it has none), where they came from, the number of
    metadata.jsonl entries naming no image of ``files``); ``table``: :func:`read_metadata`'s, read already."""
    source = caption_source(root, files)
    if source is None:
        return [None] * len(files), "", 0
    if source == CAPTION_EXTENSION:
        return [read_txt_captions(f) for f in files], source, 0
    table = read_metadata(root) if table is None else table
    names = [os.path.normpath(os.path.relpath(f, root)) for f in files]
    found = [table.get(n) or None for n in names]  # "text": [] is no caption
    return found, source, len(set(table) - set(names))


def _no_captions(root: str, n: int) -> DataError:
    return DataError(f"data.path: none of the {n} images in '{root}' has a caption; add {METADATA_FILE} (a line "
                     '{"file_name": "a.png", "text": "a caption"} per image) or a .txt caption beside each image')


class CaptionedImageFolder(ImageFolderDataset):
    """An image folder whose images have captions; ``ds[i]`` is ``(x, y, i)``: x float32 ``(C, H, W)`` in
    [-1, 1], y int64 (the class sub-folder's label, else 0), i the index that picks the captions
    ``ds.captions[i]`` (:func:`draw_captions`).  Images without a caption are left out (``ds.uncaptioned``)."""

    def __init__(self, root, image_size: Sequence[int] = (32, 32), channels: int = 3,
                 cache: Optional[bool] = None, num_threads: Optional[int] = None):
        metadata = Path(os.path.expanduser(str(root))) / METADATA_FILE
        table = read_metadata(metadata.parent) if metadata.is_file() else None  # its errors before any decoding
        super().__init__(root, image_size, channels, cache, num_threads)
        found, self.caption_source, self.unmatched = folder_captions(self.root, self.files, table)
        keep = [i for i, c in enumerate(found) if c is not None]
        self.uncaptioned = [f for f, c in zip(self.files, found) if c is None]
        if not keep:
            raise _no_captions(self.root, len(self.files))
        if self.uncaptioned:
            where = f"in {METADATA_FILE}" if self.caption_source == METADATA_FILE else "(no .txt beside them)"
            warnings.warn(f"data.path: skipped {len(self.uncaptioned)} of {len(self.files)} images in '{self.root}' "
                          f"that have no caption {where}, e.g. '{self.uncaptioned[0]}' (`ddpm data check "
                          f"{self.root}` lists them)", stacklevel=2)
            self.files = [self.files[i] for i in keep]
            self.labels = self.labels[keep]
            if self.arrays is not None:
                self.arrays = self.arrays[keep]
        self.captions: list[Captions] = [found[i] for i in keep]

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return x, y, index

    def __repr__(self) -> str:
        return (f"CaptionedImageFolder('{self.root}', {len(self)} images with captions from {self.caption_source}, "
                f"shape {self.sample_shape}, classes {len(self.class_names)}, skipped "
                f"{len(self.skipped) + len(self.uncaptioned)})")


class CaptionedDataset(torch.utils.data.Dataset):
    """Any ``(x, y)`` dataset (e.g. the latents of a :class:`CaptionedImageFolder`) with one caption tuple per
    example: ``ds[i]`` is ``(x, y, i)``; other attributes are the base dataset's."""

    def __init__(self, base, captions: Sequence[Captions]):
        if len(base) != len(captions):
            raise ValueError(f"{len(captions)} caption tuples for {len(base)} examples")
        self.base, self.captions = base, list(captions)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index][:2]
        return x, y, index

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


def _pick(seed: int, step: int, index: int, n: int) -> int:
    """A caption of ``n``, uniformly, from (seed, step, index) alone (BLAKE2b as a counter-based generator)."""
    digest = hashlib.blake2b(f"{seed}|{step}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def draw_captions(captions: Sequence[Captions], indices, seed: int, step: int) -> list[str]:
    """The caption each example ``indices[k]`` shows at training step ``step``: one of its captions, drawn
    uniformly from (seed, step, index) alone, so it is the same whichever process or batch holds the example."""
    out = []
    for i in (int(i) for i in indices):
        texts = captions[i]
        out.append(texts[0] if len(texts) == 1 else texts[_pick(seed, step, i, len(texts))])
    return out


def drop_captions(texts: Sequence[str], p: float, u: torch.Tensor) -> list[str]:
    """Classifier-free guidance's caption dropout (Ho & Salimans 2022; GLIDE, Nichol et al. 2022, Sec. 4):
    text k becomes the empty caption where ``u[k] < p``; ``u`` (len(texts),) uniform in [0, 1), drawn as the
    loop draws label dropout's."""
    if len(u) != len(texts):
        raise ValueError(f"{len(u)} uniform draws for {len(texts)} captions")
    return ["" if float(uk) < p else t for t, uk in zip(texts, u)]


def drop_words(texts: Sequence[str], p: float, seed: int, step: int, keys: Sequence) -> list[str]:
    """Word dropout: each whitespace-separated word of text k is left out where a uniform draw from (seed, step,
    ``keys[k]``, the word's place) alone falls below ``p`` (a text that would lose every word is kept whole), so
    the captions also teach what each word means without the others: "a red square" is seen as "a square" and as
    "red square" too.  ``p`` 0: unchanged."""
    if p <= 0:
        return list(texts)
    out = []
    for text, key in zip(texts, keys):
        words = text.split()
        kept = [w for j, w in enumerate(words) if _pick(seed, step, f"{key}|{j}", 1 << 30) >= p * (1 << 30)]
        out.append(" ".join(kept) if kept else text)
    return out


def distinct_captions(captions: Sequence[Captions], empty: bool = True) -> list[str]:
    """Every caption of the data once, sorted (and the empty caption where ``empty``): what a frozen text
    encoder embeds once into its cache."""
    found = {t for texts in captions for t in texts}
    if empty:
        found.add("")
    return sorted(found)
