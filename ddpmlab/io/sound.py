"""Sound out and in: 16-bit PCM WAV files written whole or not at all, and read back bit for bit.

Samples are float in [-1, 1]; 16-bit PCM stores q = round(32768 x) clamped to [-32768, 32767] and is
read back as q / 32768 (libsndfile's and librosa's scale), so a file read and written again is the
same file, and x = q / 32768 survives a write and a read exactly.  Non-finite samples are written as 0.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Union

import numpy as np
import soundfile
import torch

from ddpmlab.atomic import atomic_write_bytes
from ddpmlab.data.audio import read_sound

PCM16_SCALE = 32768.0


def to_pcm16(x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Samples in [-1, 1], (C, L) or (L,), -> int16 (L, C) (the frames-by-channels layout of files)."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"a sound is (C, L) or (L,), got shape {tuple(t.shape)}")
    q = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).mul(PCM16_SCALE).round().clamp(-32768, 32767)
    return q.to(torch.int16).T.contiguous().numpy()


def from_pcm16(q: np.ndarray) -> torch.Tensor:
    """int16 frames (L, C) -> float32 (C, L) in [-1, 1): q / 32768."""
    return torch.from_numpy(np.asarray(q, dtype=np.float64).T / PCM16_SCALE).float().contiguous()


def wav_bytes(x: Union[torch.Tensor, np.ndarray], sample_rate: int) -> bytes:
    """The 16-bit PCM WAV file of ``x`` (C, L) or (L,) in [-1, 1] at ``sample_rate`` Hz."""
    buffer = io.BytesIO()
    soundfile.write(buffer, to_pcm16(x), int(sample_rate), format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_wav(path, x: Union[torch.Tensor, np.ndarray], sample_rate: int) -> Path:
    """Write ``x`` (C, L) or (L,) in [-1, 1] to ``path`` as a 16-bit PCM WAV, atomically."""
    return atomic_write_bytes(path, wav_bytes(x, sample_rate))


def read_wav(path) -> tuple[torch.Tensor, int]:
    """(samples float32 (C, L), sample rate) of a WAV, FLAC or OGG file; 16-bit PCM exactly q / 32768."""
    return read_sound(path)


def save_wavs(x: torch.Tensor, folder, sample_rate: int, start: int = 0) -> List[Path]:
    """One WAV file per sample of ``x`` (B, C, L): folder/000000.wav, 000001.wav, ... (as PNGs are named)."""
    folder = Path(folder)
    return [write_wav(folder / f"{i:06d}.wav", s, sample_rate) for i, s in enumerate(x, start=start)]
