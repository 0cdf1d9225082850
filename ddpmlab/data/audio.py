"""A folder of sound files as a dataset (``data.dataset: audio``).

``root`` is scanned as image folders are (:func:`~ddpmlab.data.images.scan_folder`): files with an
extension of :data:`SOUND_EXTENSIONS` (any case; hidden files and folders ignored), each first-level
sub-folder holding sound a class (sorted names -> labels 0, 1, ...), files directly in ``root`` then
ignored with a warning; without such sub-folders the set is unlabeled.  Every file is decoded once with
soundfile (libsndfile) at scan time, in a few threads; a file that is not WAV, FLAC or OGG whatever its
name says, a corrupt or empty one, is skipped and listed in ``self.skipped`` as ``(path, reason)`` with
one warning, as image folders do.  Each clip is

* mixed to ``channels``: 1 the mean of its channels, 2 its first two (a mono file doubled);
* resampled to ``sample_rate`` by a windowed-sinc filter (:mod:`ddpmlab.data.resample`) when recorded
  at another rate: one warning line counts those clips and names their rates;
* cut to its first ``length`` samples, or padded with silence at its end: one warning line counts the
  padded clips;
* clamped to [-1, 1] (float files may exceed full scale; the filter may overshoot by a little).

Clips are kept in memory as float32 up to :data:`CACHE_MAX_BYTES`; larger folders are decoded again on
access.  ``ds[i]`` is ``(x, y)``: x float32 ``(C, L)`` in [-1, 1], y int64.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile
import torch

from ddpmlab.data.images import scan_folder, skip_report
from ddpmlab.data.resample import resample
from ddpmlab.errors import DataError

SOUND_EXTENSIONS = (".wav", ".flac", ".ogg")
# libsndfile's names of the containers read as sound (WAV and its 64-bit / extensible forms, FLAC, Ogg)
SOUND_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "OGG")
SOUND_CHANNELS = (1, 2)  # data.channels of sound: mono or stereo
CACHE_MAX_BYTES = 2 * 1024**3


def read_sound(path) -> tuple[torch.Tensor, int]:
    """(samples float32 (channels, frames) as stored, sample rate) of a WAV, FLAC or OGG file; raises
    ValueError (or libsndfile's error) for anything else, an empty recording or non-finite samples."""
    info = soundfile.info(str(path))
    if info.format not in SOUND_FORMATS:
        raise ValueError(f"not WAV, FLAC or OGG but {info.format} ({info.format_info})")
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("an empty recording (0 samples)")
    if not np.isfinite(data).all():
        raise ValueError("non-finite samples (NaN or infinity)")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def mix_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x (C_in, n) -> (channels, n): 1 the mean of its channels; 2 its first two (mono doubled)."""
    if channels == 1:
        return x.mean(dim=0, keepdim=True)
    return x[:2] if len(x) >= 2 else x.expand(2, -1)


def fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """x (C, n) -> (C, length): its first ``length`` samples, or x padded with silence (zeros) at its end."""
    n = x.shape[-1]
    if n >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - n))


def load_clip(path, sample_rate: int, length: int, channels: int) -> tuple[torch.Tensor, int, int]:
    """(the clip (channels, length) in [-1, 1] as the module docstring says, its file's sample rate, its
    length in samples at ``sample_rate`` before the cut or padding)."""
    x, rate = read_sound(path)
    x = resample(mix_channels(x.double(), channels), rate, sample_rate)
    n = x.shape[-1]
    return fit_length(x, length).clamp(-1.0, 1.0).float().contiguous(), rate, n


def random_segments(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, n) -> (B, C, length): a segment of each row starting at a uniform offset in [0, n - length],
    drawn from ``generator`` (on x's device)."""
    n = x.shape[-1]
    if length >= n:
        return x
    start = torch.randint(0, n - length + 1, (x.shape[0], 1, 1), generator=generator, device=x.device)
    index = start + torch.arange(length, device=x.device)
    return torch.gather(x, -1, index.expand(-1, x.shape[1], -1))


def _try_clip(path: str, sample_rate: int, length: int, channels: int):
    try:
        return load_clip(path, sample_rate, length, channels), None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        reason = " ".join(str(e).split()) or "unreadable"
        return None, f"{type(e).__name__}: {reason}"


def _notes(root: str, rates: list[int], lengths: list[int], sample_rate: int, length: int) -> list[str]:
    """The one-line notes on the clips resampled from other rates and those padded to ``length``."""
    notes, n = [], len(rates)
    other = Counter(r for r in rates if r != sample_rate)
    if other:
        named = ", ".join(f"{r} Hz" for r in sorted(other))
        notes.append(f"data.sample_rate: {sum(other.values())} of {n} clips in '{root}' are recorded at other "
                     f"rates ({named}) and were resampled to {sample_rate} Hz")
    short = sum(1 for m in lengths if m < length)
    if short:
        notes.append(f"data.length: {short} of {n} clips in '{root}' are shorter than {length} samples "
                     f"({length / sample_rate:.3g} s at {sample_rate} Hz) and were padded with silence at their end")
    return notes


class AudioFolderDataset(torch.utils.data.Dataset):
    """Sound files below ``root``; ``ds[i]`` is ``(x, y)``: x float32 ``(channels, length)`` in [-1, 1], y int64."""

    is_image = False
    is_audio = True

    def __init__(self, root, sample_rate: int = 16000, length: int = 16000, channels: int = 1,
                 cache: Optional[bool] = None, num_threads: Optional[int] = None):
        if channels not in SOUND_CHANNELS:
            raise DataError(f"data.channels: sound is mono (1) or stereo (2), got {channels}")
        self.root = root = str(Path(os.path.expanduser(str(root))))
        self.sample_rate, self.length, self.channels = int(sample_rate), int(length), int(channels)
        self.sample_shape = (self.channels, self.length)
        files, labels, self.class_names, problems = scan_folder(root, SOUND_EXTENSIONS, kind="sound")
        self.num_classes = len(self.class_names)
        n = len(files)
        self.cached = bool(cache if cache is not None else n * self.channels * self.length * 4 <= CACHE_MAX_BYTES)
        clips, rates, lengths, keep, skipped = [], [], [], [], []
        work = lambda path: _try_clip(path, self.sample_rate, self.length, self.channels)  # noqa: E731
        with ThreadPoolExecutor(max_workers=num_threads or min(8, os.cpu_count() or 1)) as pool:
            for i, (out, reason) in enumerate(pool.map(work, files)):
                if out is None:
                    skipped.append((files[i], reason))
                    continue
                keep.append(i)
                rates.append(out[1])
                lengths.append(out[2])
                if self.cached:
                    clips.append(out[0])
        self.skipped = problems + skipped
        if not keep:
            err = DataError(f"data.path: none of the {n} sound files in '{root}' could be read (e.g. "
                            f"'{skipped[0][0]}': {skipped[0][1]}); check that they are WAV, FLAC or OGG recordings")
            err.skipped = list(self.skipped)
            raise err
        if self.skipped:
            warnings.warn(f"data.path: skipped {len(self.skipped)} of {n + len(problems)} sound files in '{root}' "
                          f"that could not be used (also in dataset.skipped):\n{skip_report(self.skipped)}",
                          stacklevel=2)
        self.notes = _notes(root, rates, lengths, self.sample_rate, self.length)
        for note in self.notes:
            warnings.warn(note, stacklevel=2)
        self.files = [files[i] for i in keep]
        self.labels = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
        self.clips = torch.stack(clips) if self.cached else None

    def __len__(self) -> int:
        return len(self.files)

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index`` as float32 (channels, length) in [-1, 1]."""
        if self.clips is not None:
            return self.clips[index]
        out, reason = _try_clip(self.files[index], self.sample_rate, self.length, self.channels)
        if out is None:
            raise DataError(f"data.path: '{self.files[index]}' could not be read any more ({reason}); it changed "
                            "after the scan")
        return out[0]

    def __getitem__(self, index: int):
        return self.clip(index), self.labels[index]

    def __repr__(self) -> str:
        return (f"AudioFolderDataset('{self.root}', {len(self)} clips, shape {self.sample_shape} at "
                f"{self.sample_rate} Hz, classes {self.class_names}, skipped {len(self.skipped)})")
