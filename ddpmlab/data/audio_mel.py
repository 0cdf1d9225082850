"""Sound as images: each clip's log-mel spectrogram, normalised to [-1, 1] (``data.representation: mel``).

The two-stage route most current audio systems take (e.g. Grad-TTS, Popov et al. 2021; AudioLDM, Liu et al.
2023): an image model generates the mel spectrogram, a vocoder makes the waveform of it (here Griffin-Lim, or a
DiffWave vocoder run, :mod:`ddpmlab.evaluate.mel_sound`).  A clip x (C, L) becomes the image

    m = ln max(mel(x), 1e-5)                         data.mel.config_mel (data.n_fft, hop_length, n_mels, f_min, f_max)
    image = clamp(2 (m - lo) / (hi - lo) - 1, -1, 1)  [lo, hi] = data.mel_range, fixed in the config, not per clip

of shape (C, n_mels, frames): 1 + L // hop frames, padded at the end with -1 (the range's bottom, silence) to a
multiple of what the UNet needs (:func:`ddpmlab.config.audio.mel_multiple`).  :func:`log_mel_of_image` undoes
it: the padding cut, ``lo + (image + 1) (hi - lo) / 2``, exact inside the range (values outside it were clipped).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ddpmlab.config.audio import mel_multiple
from ddpmlab.data.audio import AudioFolderDataset
from ddpmlab.data.mel import config_mel

MEL_BATCH = 256  # clips turned into images at once


def mel_frames(data) -> int:
    """The frames of a clip's mel spectrogram before padding: 1 + data.length // data.hop_length (centred frames)."""
    return 1 + int(data.length) // int(data.hop_length)


def mel_image_shape(cfg) -> tuple:
    """(C, n_mels, frames padded to a multiple of :func:`~ddpmlab.config.audio.mel_multiple`)."""
    d, k = cfg.data, mel_multiple(cfg)
    return int(d.channels), int(d.n_mels), k * math.ceil(mel_frames(d) / k)


def normalise(log_mel: torch.Tensor, mel_range: Sequence[float]) -> torch.Tensor:
    """ln(mel) -> [-1, 1]: lo -> -1, hi -> 1 linearly, values outside [lo, hi] clipped."""
    lo, hi = float(mel_range[0]), float(mel_range[1])
    return (2.0 * (log_mel - lo) / (hi - lo) - 1.0).clamp(-1.0, 1.0)


def denormalise(image: torch.Tensor, mel_range: Sequence[float]) -> torch.Tensor:
    """[-1, 1] -> ln(mel), the inverse of :func:`normalise` inside the range (an image is clipped to [-1, 1] first)."""
    lo, hi = float(mel_range[0]), float(mel_range[1])
    return lo + (image.clamp(-1.0, 1.0) + 1.0) * (0.5 * (hi - lo))


def mel_image(x: torch.Tensor, cfg) -> torch.Tensor:
    """Clips x (..., C, L) -> their mel images (..., C, n_mels, frames), float32 (the module docstring), computed in
    float64 (float32's STFT error is ~1e-3 in the log of quiet bands)."""
    image = normalise(config_mel(x.double(), cfg.data), cfg.data.mel_range).float()
    pad = mel_image_shape(cfg)[-1] - image.shape[-1]
    return torch.nn.functional.pad(image, (0, pad), value=-1.0)


def log_mel_of_image(image: torch.Tensor, data) -> torch.Tensor:
    """Mel images (..., C, n_mels, padded frames) -> ln(mel) (..., C, n_mels, 1 + L // hop): the padding cut,
    :func:`denormalise`; what data.mel.config_mel gives of a clip, within the range."""
    return denormalise(image[..., :mel_frames(data)].float(), data.mel_range)


class MelImageDataset(torch.utils.data.Dataset):
    """A sound folder's clips as mel images, computed once and held in memory: ``ds[i]`` is ``(x, y)``, x float32
    (C, n_mels, frames) in [-1, 1], y int64.  ``sound`` is the :class:`AudioFolderDataset` they come from
    (its files, skipped files, notes, rate); ``x`` and ``y`` hold every image and label."""

    is_image = True  # the denoiser's data: images (the ordinary image path of training)
    is_audio = True  # of sound

    def __init__(self, sound: AudioFolderDataset, cfg):
        self.sound, self.data = sound, cfg.data
        self.root, self.sample_rate = sound.root, sound.sample_rate
        self.class_names, self.num_classes = sound.class_names, sound.num_classes
        self.sample_shape = mel_image_shape(cfg)
        self.x = torch.cat([mel_image(torch.stack([sound.clip(i) for i in range(s, min(s + MEL_BATCH, len(sound)))]),
                                      cfg) for s in range(0, len(sound), MEL_BATCH)])
        self.y = sound.labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        return (f"MelImageDataset('{self.root}', {len(self)} clips as mel images {self.sample_shape}, "
                f"classes {self.class_names})")
