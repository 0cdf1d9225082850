"""``ddpm data shards SRC OUT``: an image folder written as WebDataset tar shards (:mod:`ddpmlab.data.shards`).

SRC is read as training reads a folder: class sub-folders are the labels (a ``cls`` member per sample), the
captions of ``metadata.jsonl`` or of a ``.txt`` beside each image (:mod:`ddpmlab.data.captions`) a ``txt``
member (one caption a line; a line break inside a caption becomes a space); images without a caption (where
the folder has captions) and files that do not decode are left out and counted in one warning line.  The
images keep their encoded bytes (no re-encoding).  The samples are shuffled once (seeded) before they are cut
into shards of ``per_shard``, so that a shard holds a mix of the classes; ``OUT/shards.json`` records each
shard's sample count (a resumed run skips whole shards by it), whether every sample has a caption and a
label, and the class names.  Same folder and seed, same shards, byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import torch

from ddpmlab.atomic import atomic_write_text
from ddpmlab.data.captions import folder_captions
from ddpmlab.data.images import open_image, scan_folder
from ddpmlab.data.shards import INDEX_FILE
from ddpmlab.errors import DataError
from ddpmlab.progress import progress_bar

SHARD_NAME = "shard-{:06d}.tar"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no clock, owner or umask in the bytes
    tar.addfile(info, io.BytesIO(data))


def _usable(files: list, captions: list, captioned: bool) -> tuple[list, dict]:
    """(indices of the files that decode and, where the folder has captions, have one; {reason: [paths]})."""
    keep, skipped = [], {}
    for i, path in enumerate(files):
        if captioned and captions[i] is None:
            skipped.setdefault("without a caption", []).append(path)
            continue
        try:
            with open_image(path) as img:
                img.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure leaves the file out
            skipped.setdefault(f"that do not decode ({type(e).__name__})", []).append(path)
            continue
        keep.append(i)
    return keep, skipped


def write_shards(src, out, per_shard: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Write the images of folder ``src`` as shards ``out``/shard-000000.tar, ... of ``per_shard`` samples
    each (the last may hold fewer) and ``out``/shards.json; returns the index (what shards.json says)."""
    if per_shard < 1:
        raise DataError(f"--per-shard must be at least 1, got {per_shard}")
    src, out = str(Path(os.path.expanduser(str(src)))), Path(os.path.expanduser(str(out)))
    if out.exists():
        raise DataError(f"'{out}' exists; choose a new folder for the shards")
    files, labels, class_names, _ = scan_folder(src)
    captions, source, _ = folder_captions(src, files)
    keep, skipped = _usable(files, captions, bool(source))
    if skipped:
        counts = "; ".join(f"{len(paths)} {why}, e.g. '{paths[0]}'" for why, paths in skipped.items())
        warnings.warn(f"data shards: left out {sum(map(len, skipped.values()))} of {len(files)} images in '{src}' "
                      f"({counts})", stacklevel=2)
    if not keep:
        raise DataError(f"data shards: no image of '{src}' can be written (see the warning above)")
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed)).tolist()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    table, bar = {}, progress_bar(progress, total=len(keep), desc="writing shards", unit="img")
    try:
        for s, begin in enumerate(range(0, len(order), per_shard)):
            name = SHARD_NAME.format(s)
            with tarfile.open(partial / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for k in order[begin:begin + per_shard]:
                    i = keep[k]
                    key = f"{k:08d}"
                    _member(tar, f"{key}{Path(files[i]).suffix.lower()}", Path(files[i]).read_bytes())
                    if source:
                        text = "\n".join(" ".join(c.split("\n")).replace("\r", " ") for c in captions[i])
                        _member(tar, f"{key}.txt", text.encode("utf-8"))
                    if class_names:
                        _member(tar, f"{key}.cls", str(labels[i]).encode())
                    bar.update(1)
            table[name] = {"samples": len(order[begin:begin + per_shard])}
    finally:
        bar.close()
    index = {"format": "ddpmlab shards 1", "shards": table, "samples": len(keep), "captions": bool(source),
             "labels": bool(class_names), "class_names": class_names, "seed": seed}
    atomic_write_text(partial / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    partial.rename(out)
    return index
