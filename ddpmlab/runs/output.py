"""Where samples go: a picture file or a folder of one PNG per sample, the raw samples written first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ddpmlab.errors import OPTION, OptionError


def grid_scale(shape: Sequence[int]) -> int:
    """Pixel repetition for a grid of (C, H, W) images: small images enlarged up to 4x, to ~128 px."""
    return max(1, min(4, 128 // max(shape[1:])))


@dataclass
class Output:
    """Where samples go: a picture file (``path``), or a folder of one PNG per sample plus ``grid.png``."""

    path: Path
    is_folder: bool

    @property
    def picture(self) -> Path:
        return self.path / "grid.png" if self.is_folder else self.path

    @property
    def raw(self) -> Path:
        return self.path / "samples.npz" if self.is_folder else self.path.with_suffix(".npz")


def resolve_output(out, default: Path) -> Output:
    """The output for ``out`` (None: the file ``default``), checked before any sampling.

    A path that is an existing folder, ends with '/', or has no extension is a folder; a file
    needs an extension Pillow writes (.png, .jpg, ...); another is an OptionError about 'out'.
    """
    if out is None:
        return Output(Path(default), False)
    text, path = str(out), Path(out)
    if path.is_dir() or text.endswith(("/", "\\")) or not path.suffix:
        return Output(path, True)
    if path.suffix.lower() not in Image.registered_extensions():
        raise OptionError("out", f"{OPTION} {text}: unknown picture extension '{path.suffix}'; use .png (or give a "
                                 "folder for one PNG per sample)")
    return Output(path, False)


def write_raw(x: torch.Tensor, output: Output) -> Path:
    """The samples as .npz (key 'samples', the data's scale), written before any picture."""
    output.raw.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output.raw, samples=x.numpy())
    return output.raw
