"""Pictures and files of sound samples: a waveform and its log-mel spectrogram per sample, one WAV each.

Sound cannot go in an image grid: :func:`save_sound_picture` draws each of the first few samples as a
row of two panels (the waveform over time; the log-mel spectrogram of the run's data section,
:func:`~ddpmlab.data.mel.config_mel`, bands over frames), and :func:`save_sound_samples` writes that
picture and every sample as a 16-bit WAV file (:mod:`ddpmlab.io.sound`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ddpmlab.data.mel import config_mel
from ddpmlab.io.sound import save_wavs
from ddpmlab.runs import Output
from ddpmlab.viz.images import new_figure, save_figure

MAX_ROWS = 8  # samples drawn in one picture (all of them go to WAV files)


def save_sound_picture(x: torch.Tensor, path, data, title: str = "samples",
                       names: Optional[Sequence[str]] = None) -> Path:
    """Waveforms and log-mel spectrograms of the first :data:`MAX_ROWS` sounds x (n, C, L) (channels mixed to
    one) at ``path``; ``data`` is the run's data section (sample_rate and the mel keys); ``names`` label rows."""
    x = x[:MAX_ROWS].detach().to("cpu", torch.float64).mean(dim=1)  # (n, L)
    n, length = x.shape
    fig, axes = new_figure((10, 1.6 * n + 0.6), dpi=80, nrows=n, ncols=2, squeeze=False)
    seconds = torch.arange(length, dtype=torch.float64) / data.sample_rate
    spectra = config_mel(x, data).numpy()  # (n, n_mels, frames)
    for i in range(n):
        wave, spec = axes[i]
        wave.plot(seconds.numpy(), x[i].numpy(), lw=0.5, c="tab:blue")
        wave.set_ylim(-1.05, 1.05)
        wave.set_xlim(0, length / data.sample_rate)
        wave.set_ylabel(names[i] if names is not None and i < len(names) else f"sample {i}")
        spec.imshow(spectra[i], origin="lower", aspect="auto", cmap="magma", vmin=-11.5)
        spec.set_yticks([])
    axes[-1][0].set_xlabel("seconds")
    axes[-1][1].set_xlabel(f"frames (hop {data.hop_length}), {data.n_mels} mel bands")
    axes[0][0].set_title(f"{title}: waveforms")
    axes[0][1].set_title("log-mel spectrograms")
    fig.tight_layout()
    return save_figure(fig, path)


def save_sound_samples(x: torch.Tensor, output: Output, data, title: str = "samples") -> List[Path]:
    """The picture of sounds x (n, C, L) at ``output.picture`` and one WAV per sample: in the output folder, or
    for a picture file in the folder of its name without the extension (samples/ddpm_50.png: samples/ddpm_50/).
    Returns the files written, the picture first."""
    folder = output.path if output.is_folder else output.path.with_suffix("")
    picture = save_sound_picture(x, output.picture, data, title)
    return [picture, *save_wavs(x, folder, data.sample_rate)]
