"""A vocoder run at work: a recording re-synthesised from its mel spectrogram, scored beside Griffin-Lim.

:func:`vocode` computes the log-mel spectrogram of a waveform with the run's data settings (as training
did, :func:`ddpmlab.models.conditioned.mel_condition`) and draws the waveform from it through the run
layer, as every sampler call is planned (the mel is the request's ``cond``, bound to the network as a
low-res image is for super-resolution).  DiffWave is convolutional, so the recording keeps its own
length: the run is seen with data.length set to it.  :func:`compare` scores the re-synthesis and the
Griffin-Lim inversion of the same spectrogram against the original (:mod:`.audio_quality`), with the
real-time factor of each on this machine.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from ddpmlab.data.audio import mix_channels, read_sound
from ddpmlab.data.resample import resample
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.audio_quality import (
    GRIFFIN_LIM_ITERATIONS,
    griffin_lim_from_mel,
    mel_cepstral_distortion,
    mr_stft_distance,
    real_time_factor,
)
from ddpmlab.models.conditioned import mel_condition
from ddpmlab.runs import Run, SamplingRequest, draw_samples, plan_request


def check_vocoder(run: Run) -> None:
    """A one-line DDPMError unless ``run`` is a vocoder (sound, model.condition=mel)."""
    name = run.dir or "this run"
    if not run.is_audio:
        raise DDPMError(f"{name} is an image run (data.dataset={run.cfg.data.dataset}); --audio needs a vocoder run, "
                        "trained on sound with model.condition=mel (e.g. `ddpm train --config vocoder data.path=DIR`)")
    if run.cfg.model.condition != "mel":
        raise DDPMError(f"{name} generates sound without a mel spectrogram to follow (model.condition="
                        f"{run.cfg.model.condition}); vocode with a run trained with model.condition=mel")


def read_recording(path, run: Run) -> Tuple[torch.Tensor, Optional[str]]:
    """(the recording at ``path`` as the run's channels (C, L) at its data.sample_rate, clamped to [-1, 1],
    a note when it was resampled or mixed, else None); a one-line DDPMError for a file that is not sound."""
    d = run.cfg.data
    try:
        x, rate = read_sound(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure: the file is not usable sound
        raise DDPMError(f"--audio '{path}' is not readable sound ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); give a WAV, FLAC or OGG file") from None
    notes = []
    if len(x) != d.channels:
        notes.append(f"{len(x)} channel(s) mixed to {d.channels}")
    if rate != d.sample_rate:
        notes.append(f"resampled from {rate} Hz to the run's {d.sample_rate} Hz (data.sample_rate)")
    y = resample(mix_channels(x.double(), d.channels), rate, d.sample_rate).clamp(-1.0, 1.0).float()
    if y.shape[-1] < d.hop_length:
        raise DDPMError(f"--audio '{path}' holds {y.shape[-1]} samples at {d.sample_rate} Hz, less than one mel "
                        f"frame (data.hop_length={d.hop_length}); give a longer recording")
    return y.contiguous(), (f"{Path(path).name}: " + "; ".join(notes)) if notes else None


def run_of_length(run: Run, length: int) -> Run:
    """``run`` seen with clips of ``length`` samples (data.length): the same network and weights."""
    cfg = copy.deepcopy(run.cfg)
    cfg.data.length = int(length)
    return dataclasses.replace(run, cfg=cfg)


def vocode(run: Run, wave: torch.Tensor, request: SamplingRequest = SamplingRequest(), *, progress: bool = False,
           log: Callable[[str], None] = lambda m: None) -> Tuple[torch.Tensor, float]:
    """(the re-synthesis (C, L) of ``wave`` (C, L) at the run's rate from its log-mel spectrogram, the seconds
    the sampler took); the sampler, steps and seed as ``request`` says (the run's own where it says nothing,
    said through ``log``), without class labels (a class-conditional vocoder: its "no label", guidance 0)."""
    check_vocoder(run)
    mel = mel_condition(wave[None], run.cfg.data)  # (1, C * n_mels, frames), as training computes it
    sized = run_of_length(run, wave.shape[-1])
    request = dataclasses.replace(request, n=1, cond=mel, label=None, cycle_classes=False,
                                  guidance=0.0 if run.num_classes else None)
    plan = plan_request(sized, request, log=log)
    start = time.perf_counter()
    x = draw_samples(sized, plan, progress=progress)[0]
    return x, time.perf_counter() - start


def scores(x: torch.Tensor, ref: torch.Tensor, data, seconds: float) -> Dict[str, float]:
    """MR-STFT distance, MCD (dB) and real-time factor of ``x`` (C, L) against ``ref`` (channels averaged)."""
    mcd = mel_cepstral_distortion(x, ref, data.sample_rate, data.n_fft, data.hop_length, data.n_mels, data.f_min,
                                  data.f_max)
    return {"mr_stft": float(mr_stft_distance(x, ref).mean()), "mcd_db": float(mcd.mean()),
            "rtf": real_time_factor(seconds, ref.shape[-1], data.sample_rate)}


def compare(run: Run, wave: torch.Tensor, request: SamplingRequest = SamplingRequest(), *,
            iterations: int = GRIFFIN_LIM_ITERATIONS, progress: bool = False,
            log: Callable[[str], None] = lambda m: None) -> dict:
    """The vocoder's re-synthesis of ``wave`` (C, L) and Griffin-Lim's inversion of the same mel spectrogram, each
    with :func:`scores` against ``wave``: {"diffwave": (x, scores), "griffin_lim": (x, scores)}."""
    x, seconds = vocode(run, wave, request, progress=progress, log=log)
    start = time.perf_counter()
    mel = mel_condition(wave[None], run.cfg.data)[0].reshape(wave.shape[0], run.cfg.data.n_mels, -1)
    gl = griffin_lim_from_mel(mel, wave.shape[-1], run.cfg.data, iterations,
                              generator=torch.Generator().manual_seed(request.seed))
    gl_seconds = time.perf_counter() - start
    d = run.cfg.data
    return {"diffwave": (x, scores(x, wave, d, seconds)), "griffin_lim": (gl, scores(gl, wave, d, gl_seconds))}


def format_comparison(result: dict, what: str) -> str:
    """The two rows of :func:`compare`'s scores under a header naming ``what`` was re-synthesised."""
    lines = [f"{what}: re-synthesis from its mel spectrogram against the original (lower is better; rtf: seconds "
             "per second of sound)", f"  {'':12s} {'MR-STFT':>8s} {'MCD dB':>7s} {'RTF':>7s}"]
    for name, (_, s) in result.items():
        lines.append(f"  {name:12s} {s['mr_stft']:8.3f} {s['mcd_db']:7.2f} {s['rtf']:7.3f}")
    return "\n".join(lines)
