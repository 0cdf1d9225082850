"""A mel run's samples as sound: generated log-mel images (``data.representation: mel``) back to waveforms.

The second stage of the two-stage route (:mod:`ddpmlab.data.audio_mel`): each image is un-normalised to ln(mel)
with the run's fixed data.mel_range, its padding cut, and made a waveform by

* Griffin-Lim (the default): the mel magnitudes to linear ones by NNLS on the filter bank, then fast Griffin-Lim
  (:func:`ddpmlab.evaluate.audio_quality.griffin_lim_from_mel`), from random phases seeded per call;
* or a DiffWave vocoder run (``data.vocoder``, ``ddpm sample --vocoder RUN``; a run trained with
  model.condition=mel on the same mel settings), sampled through the run layer with the log-mel as its
  conditioning, as ``ddpm vocode`` does.

What ``ddpm sample``, the training drawings and ``ddpm eval`` write or judge of a mel run is this sound, so the
classifier's scores are end to end: the image model and the inversion together.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from ddpmlab.data.audio_mel import log_mel_of_image
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.audio_quality import GRIFFIN_LIM_ITERATIONS, griffin_lim_from_mel
from ddpmlab.evaluate.vocoder import check_vocoder, run_of_length
from ddpmlab.runs import Run, SamplingRequest, draw_samples, load_run, plan_request

# the data keys a vocoder's mel spectrogram must share with the mel run's images
MEL_KEYS = ("sample_rate", "channels", "n_fft", "hop_length", "n_mels", "f_min", "f_max")
GL_BATCH = 64  # images inverted at once (bounds the memory of the NNLS and STFT tensors)


def is_mel_run(run: Run) -> bool:
    """A run of sound whose denoiser draws log-mel images (data.dataset=audio, data.representation=mel)."""
    return bool(run.is_audio and run.cfg.data.representation == "mel")


def griffin_lim_sound(images: torch.Tensor, data, iterations: int = GRIFFIN_LIM_ITERATIONS,
                      seed: int = 0) -> torch.Tensor:
    """Mel images (n, C, n_mels, frames) -> waveforms (n, C, data.length) by Griffin-Lim, clamped to [-1, 1];
    batch b's random phases seeded by seed + b."""
    log_mel = log_mel_of_image(images, data)
    out = [griffin_lim_from_mel(part, int(data.length), data, iterations,
                                generator=torch.Generator().manual_seed(seed + b))
           for b, part in enumerate(log_mel.split(GL_BATCH))]
    return torch.cat(out).clamp(-1.0, 1.0)


def check_vocoder_fits(run: Run, vocoder: Run) -> None:
    """A one-line DDPMError unless ``vocoder`` is a vocoder run whose mel spectrogram is the mel run's."""
    check_vocoder(vocoder)
    a, b = run.cfg.data, vocoder.cfg.data
    differ = [f"data.{k} {getattr(a, k)} vs {getattr(b, k)}" for k in MEL_KEYS if getattr(a, k) != getattr(b, k)]
    if differ:
        raise DDPMError(f"vocoder {vocoder.dir}: its mel spectrogram is not this run's ({'; '.join(differ)}); train "
                        "the mel run and the vocoder with the same data.* mel settings, or use Griffin-Lim (no vocoder)")


def load_vocoder(path, run: Run) -> Run:
    """The vocoder run at ``path`` (its EMA weights, on the mel run's device), checked to fit ``run``."""
    if not Path(path).expanduser().is_dir():
        raise DDPMError(f"vocoder '{path}' is not a run folder; give a vocoder run (ddpm train --config vocoder), or "
                        "leave it out for Griffin-Lim")
    vocoder = load_run(Path(path).expanduser(), "ema", run.device)
    check_vocoder_fits(run, vocoder)
    return vocoder


def vocoded_sound(images: torch.Tensor, data, vocoder: Run, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Mel images (n, C, n_mels, frames) -> waveforms (n, C, data.length) drawn by a vocoder run conditioned on
    their log-mel (its own sampler and steps, no class labels), clamped to [-1, 1]."""
    log_mel = log_mel_of_image(images, data)
    cond = log_mel.reshape(len(log_mel), -1, log_mel.shape[-1])  # (n, C * n_mels, frames): mel_condition's layout
    sized = run_of_length(vocoder, int(data.length))
    request = SamplingRequest(n=len(cond), cond=cond, seed=seed, cycle_classes=False,
                              guidance=0.0 if vocoder.num_classes else None)
    plan = plan_request(sized, request, log=lambda m: None)
    return draw_samples(sized, plan, progress=progress).clamp(-1.0, 1.0)


def with_vocoder(run: Run, vocoder: Optional[str]) -> Run:
    """``run`` with data.vocoder set to ``vocoder`` (a mel run's; checked), or ``run`` itself for None."""
    if vocoder is None:
        return run
    if not is_mel_run(run):
        raise DDPMError(f"--vocoder makes sound of generated mel images; {run.dir or 'this run'} is not a mel run "
                        "(data.representation=mel)")
    load_vocoder(vocoder, run)  # fails now, not after sampling
    cfg = copy.deepcopy(run.cfg)
    cfg.data.vocoder = str(vocoder)
    return dataclasses.replace(run, cfg=cfg)


def as_sound(run: Run, x: torch.Tensor, vocoder: Union[Run, str, None] = None, seed: int = 0,
             progress: bool = False) -> torch.Tensor:
    """A run's samples as sound: a mel run's images (n, C, n_mels, frames) made waveforms (n, C, L) by ``vocoder``
    (a run or its folder; None: data.vocoder, else Griffin-Lim); any other run's samples as they are."""
    if not is_mel_run(run):
        return x
    vocoder = vocoder if vocoder is not None else run.cfg.data.vocoder
    if vocoder is None:
        return griffin_lim_sound(x, run.cfg.data, seed=seed)
    vocoder = load_vocoder(vocoder, run) if not isinstance(vocoder, Run) else vocoder
    return vocoded_sound(x, run.cfg.data, vocoder, seed=seed, progress=progress).cpu()
