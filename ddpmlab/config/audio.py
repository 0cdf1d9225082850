"""The sound keys of a config: DiffWave's presets and the checks of data.dataset=audio and model.kind=diffwave.

Never changes the config; each error names the key.
"""

from __future__ import annotations

import math

from ddpmlab.config.presets import preset_values
from ddpmlab.config.sections import Config, DiffWaveConfig
from ddpmlab.errors import ConfigError

# Kong et al. 2021, Sec. 5: DiffWave_BASE (30 layers, C = 64, dilation cycle [1, 2, ..., 512]) and
# DiffWave_LARGE (C = 128); small: a model a CPU trains in minutes (receptive field 253 samples)
DIFFWAVE_PRESETS = {
    "base": dict(layers=30, channels=64, dilation_cycle=10),
    "large": dict(layers=30, channels=128, dilation_cycle=10),
    "small": dict(layers=12, channels=32, dilation_cycle=6),
}
DIFFWAVE_KEYS = ("layers", "channels", "dilation_cycle")
SOUND_CHANNELS = (1, 2)
REPRESENTATIONS = ("wave", "mel")  # data.representation of sound (ddpmlab.data.audio_mel: mel images)


def diffwave_settings(d: DiffWaveConfig, source: str = "config") -> dict:
    """DiffWave's {layers, channels, dilation_cycle}: diffwave.preset's, else the explicit keys (base's where null)."""
    if d.preset is None:
        return {k: DIFFWAVE_PRESETS["base"][k] if getattr(d, k) is None else getattr(d, k) for k in DIFFWAVE_KEYS}
    return preset_values("diffwave", d, DIFFWAVE_PRESETS, source, "DiffWave")


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def validate_audio(cfg: Config, source: str = "config") -> None:
    """Sound data goes with DiffWave and DiffWave with sound; the sound keys' values."""
    d, kind = cfg.data, cfg.model.kind
    audio = d.dataset == "audio"
    if d.representation not in REPRESENTATIONS or (d.representation == "mel" and not audio):
        raise ConfigError(f"{source}: data.representation={d.representation!r}: sound (data.dataset=audio) is read "
                          f"as one of {', '.join(REPRESENTATIONS)}; other data as wave (the default)")
    if d.vocoder and not (audio and d.representation == "mel"):
        raise ConfigError(f"{source}: data.vocoder={d.vocoder} makes sound of generated mel images; set "
                          "data.representation=mel (sound data), or data.vocoder=null")
    if audio and d.representation == "mel":
        _validate_mel_images(cfg, source)
    if cfg.model.condition == "mel" and not (audio and kind == "diffwave"):
        raise ConfigError(f"{source}: model.condition=mel is a vocoder's (DiffWave conditioned on the mel spectrogram "
                          f"of sound): set data.dataset=audio and model.kind=diffwave, or model.condition=none")
    if kind == "diffwave" and not audio:
        raise ConfigError(f"{source}: model.kind=diffwave generates sound; set data.dataset=audio (and data.path "
                          f"to a folder of WAV, FLAC or OGG files), or a model for {d.dataset} (unet, dit, mlp)")
    if audio and kind != "diffwave" and d.representation == "wave":
        raise ConfigError(f"{source}: data.dataset=audio is sound: set model.kind=diffwave (model.kind={kind} is "
                          "for images or points; data.representation=mel makes each clip an image for a UNet)")
    _validate_diffwave(cfg.diffwave, kind, source)
    if d.crop is not None and not (_positive_int(d.crop) and d.crop <= d.length and cfg.model.condition == "mel"):
        raise ConfigError(f"{source}: data.crop={d.crop!r} trains a vocoder (sound, model.condition=mel) on random "
                          f"segments of this many samples, at most data.length={d.length}; other runs take null")
    if not audio:
        return
    if not d.path:
        raise ConfigError(f"{source}: 'data.path' is required when data.dataset is 'audio': a folder of WAV, FLAC "
                          "or OGG files (sub-folders as classes)")
    if d.channels not in SOUND_CHANNELS:
        raise ConfigError(f"{source}: 'data.channels' must be 1 (mono) or 2 (stereo) for sound, got {d.channels}")
    for key in ("sample_rate", "length", "n_fft", "hop_length", "n_mels"):
        if not _positive_int(getattr(d, key)):
            raise ConfigError(f"{source}: 'data.{key}' must be a positive integer, got {getattr(d, key)!r}")
    nyquist = d.sample_rate / 2
    f_max = nyquist if d.f_max is None else d.f_max
    if not 0 <= d.f_min < f_max <= nyquist:
        raise ConfigError(f"{source}: need 0 <= data.f_min < data.f_max <= data.sample_rate / 2 = {nyquist:g} Hz, "
                          f"got f_min={d.f_min}, f_max={d.f_max}")
    hop = math.prod(cfg.diffwave.upsample)  # the local conditioner's frames * hop samples: one frame per hop
    if kind == "diffwave" and hop != d.hop_length:
        raise ConfigError(f"{source}: diffwave.upsample {cfg.diffwave.upsample} upsamples the mel frames "
                          f"{hop}-fold, but data.hop_length is {d.hop_length}; make their product equal")
    _refuse_image_features(cfg, source)


def _validate_diffwave(w: DiffWaveConfig, kind: str, source: str) -> None:
    if kind != "diffwave":
        given = [f"diffwave.{k}" for k in ("preset",) + DIFFWAVE_KEYS if getattr(w, k) is not None]
        if given:
            raise ConfigError(f"{source}: {', '.join(given)} {'size' if len(given) > 1 else 'sizes'} DiffWave, but "
                              f"model.kind is {kind!r}; set model.kind=diffwave or drop them")
        return
    for key, value in diffwave_settings(w, source).items():
        if not _positive_int(value):
            raise ConfigError(f"{source}: 'diffwave.{key}' must be a positive integer, got {value!r}")
    for key in ("embed_dim", "label_dim"):
        if not _positive_int(getattr(w, key)):
            raise ConfigError(f"{source}: 'diffwave.{key}' must be a positive integer, got {getattr(w, key)!r}")
    if not w.upsample or not all(_positive_int(s) for s in w.upsample):
        raise ConfigError(f"{source}: 'diffwave.upsample' must be a list of positive integer strides (their "
                          f"product data.hop_length), got {w.upsample}")


def _refuse_image_features(cfg: Config, source: str) -> None:
    """What works on pictures only, refused on sound in one line."""
    m = cfg.model
    if m.condition == "low_res":
        raise ConfigError(f"{source}: model.condition=low_res conditions on a low-resolution image; sound "
                          "(data.dataset=audio) takes model.condition=none, or mel (a vocoder)")
    if m.condition == "mel" and cfg.train.cond_noise:
        raise ConfigError(f"{source}: train.cond_noise={cfg.train.cond_noise} augments a low-res image; a vocoder "
                          "(model.condition=mel) takes its mel spectrogram clean: set train.cond_noise=0")
    if m.autoencoder:
        raise ConfigError(f"{source}: model.autoencoder (latent diffusion) encodes images; DiffWave works on the "
                          "waveform: set model.autoencoder=null")
    if cfg.train.eval_every:
        raise ConfigError(f"{source}: train.eval_every's metrics (FID, SWD, ...) score images or points, not "
                          "sound: set train.eval_every=0")


def mel_multiple(cfg: Config) -> int:
    """What a mel image's height and width must be multiples of: 2^(len(unet.channel_mults) - 1), the UNet halving
    them at each level after the first."""
    return 2 ** max(len(cfg.unet.channel_mults) - 1, 0)


def _validate_mel_images(cfg: Config, source: str) -> None:
    """data.representation=mel: a UNet on log-mel images, their fixed range, the bands' divisibility."""
    d, m = cfg.data, cfg.model
    if m.kind != "unet":
        raise ConfigError(f"{source}: data.representation=mel makes each clip a log-mel image for model.kind=unet, "
                          f"got model.kind={m.kind} (DiffWave generates waveforms: data.representation=wave)")
    if m.condition != "none":
        raise ConfigError(f"{source}: model.condition={m.condition} does not go with data.representation=mel (a "
                          "vocoder generates the waveform: data.representation=wave); set model.condition=none")
    r = d.mel_range
    if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(v, (int, float)) for v in r)
            or not r[0] < r[1]):
        raise ConfigError(f"{source}: data.mel_range must be [low, high] with low < high (the natural-log mel values "
                          f"mapped to -1 and 1, e.g. [-10, 2]), got {r!r}")
    k = mel_multiple(cfg)
    if isinstance(d.n_mels, int) and d.n_mels % k:
        raise ConfigError(f"{source}: data.n_mels={d.n_mels} must be a multiple of {k}: the UNet halves the mel image "
                          f"{len(cfg.unet.channel_mults) - 1} times (unet.channel_mults={list(cfg.unet.channel_mults)})")
