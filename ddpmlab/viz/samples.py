"""Samples of a run as pictures: a grid of images, a scatter plot of 2-D points over the data, or sound's
waveforms and spectrograms with a WAV file per sample."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from ddpmlab.data import build_dataset
from ddpmlab.evaluate.mel_sound import as_sound
from ddpmlab.io.images import save_grid, save_images
from ddpmlab.runs import Output, Run, grid_scale
from ddpmlab.viz.images import save_scatter
from ddpmlab.viz.sound import save_sound_samples


def reference_points(data, n: int = 2000) -> torch.Tensor:
    """Up to ``n`` points of a 2-D dataset, (n, 2): the grey backdrop of a run's scatter plots."""
    return torch.stack([data[i][0] for i in range(min(len(data), n))])


def save_samples(run: Run, x: torch.Tensor, output: Output, title: str = "samples",
                 reference: Optional[torch.Tensor] = None, nrow: Optional[int] = None) -> List[Path]:
    """Pictures of samples x (n, *shape): the grid (or scatter plot) at ``output.picture``, and for a
    folder output one PNG per image beside it.  Returns the files written.  ``reference``: the
    scatter plot's backdrop (default: the run's data, built from its config).  ``nrow``: images in a
    grid row (default: about the square root of n; a text run's plan: one row per prompt).  Sound: its picture
    and one WAV per sample (:func:`~ddpmlab.viz.sound.save_sound_samples`)."""
    if run.is_audio:  # a mel run's images made sound first (Griffin-Lim or its data.vocoder)
        return save_sound_samples(as_sound(run, x), output, run.cfg.data, title=title)
    if not run.is_image:
        ref = reference if reference is not None else reference_points(build_dataset(run.cfg))
        return [save_scatter(x, output.picture, reference=ref, title=title)]
    files = [save_grid(x, output.picture, nrow=nrow, scale=grid_scale(run.image_shape))]
    if output.is_folder:
        files += save_images(x, output.path)
    return files
