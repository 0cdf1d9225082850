"""Latent data for latent diffusion (Rombach et al. 2022): what ``model.autoencoder`` names, and cached encodings.

``model.autoencoder`` is either

* a run folder of ``ddpm train-autoencoder``: ``config.yaml`` with ``stage: autoencoder``, its
  checkpoints, and ``autoencoder.json`` (scale factor, latent statistics, PSNR) written at its end; or
* a local diffusers ``AutoencoderKL`` folder: ``config.json`` (``_class_name: AutoencoderKL``) and
  ``diffusion_pytorch_model.safetensors``, e.g. the VAE of Stable Diffusion.

:func:`describe_autoencoder` reads only those small files (no weights), so :func:`latent_shape`
knows the denoiser's input without building a network.  The training data is encoded once
(:func:`cached_latents`) into ``<cache_dir>/latents/<key>.safetensors``; the key hashes the
dataset's content and the autoencoder's weights and scaling (as the FID reference statistics are
keyed, :mod:`ddpmlab.evaluate.reference`), so new data or a retrained autoencoder never reuses stale latents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import yaml
from safetensors.torch import load_file

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.config import config_from_dict
from ddpmlab.errors import ConfigError

AE_STATS_FILE = "autoencoder.json"  # in an autoencoder run: scale/shift factor, latent mean/std, PSNR
LATENTS_FILE = "latents.json"  # in a latent diffusion run: which autoencoder it was trained with
LATENT_CACHE_VERSION = "1"


@dataclass(frozen=True)
class AutoencoderSource:
    """What ``model.autoencoder`` points to, from its small files: kind 'run' or 'diffusers'."""

    kind: str
    path: Path
    in_channels: int
    latent_channels: int
    downsampling: int  # f: the latent is (latent_channels, H/f, W/f)
    scale: float  # z' = (mu - shift) * scale
    shift: float
    stats: Optional[dict] = None  # a run's autoencoder.json

    def latent_shape(self, image_shape) -> tuple:
        f = self.downsampling
        return (self.latent_channels, int(image_shape[1]) // f, int(image_shape[2]) // f)


def _bad_path(path, why: str) -> ConfigError:
    return ConfigError(
        f"model.autoencoder '{path}' {why}; it must be a run folder of `ddpm train-autoencoder` (config.yaml with "
        "stage: autoencoder, checkpoints/, autoencoder.json) or a diffusers AutoencoderKL folder (config.json with "
        "_class_name AutoencoderKL and diffusion_pytorch_model.safetensors)")


def _stamp(path: Path) -> tuple:
    """What identifies a folder's describing files now (so a retrained autoencoder is read again)."""
    files = [path / n for n in ("config.yaml", AE_STATS_FILE, "config.json")]
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())


def describe_autoencoder(path) -> AutoencoderSource:
    """The :class:`AutoencoderSource` at ``path``; one-line ConfigError when it is neither kind."""
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise _bad_path(path, "does not exist" if not p.exists() else "is not a folder")
    return _describe(p, _stamp(p))


@functools.lru_cache(maxsize=32)
def _describe(p: Path, stamp: tuple) -> AutoencoderSource:
    if (p / "config.yaml").is_file():
        return _describe_run(p)
    if (p / "config.json").is_file():
        return _describe_diffusers(p)
    raise _bad_path(p, "has neither config.yaml nor config.json")


def _describe_run(p: Path) -> AutoencoderSource:
    try:
        raw = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        raise _bad_path(p, "has a config.yaml that is not valid YAML") from None
    if not isinstance(raw, dict) or raw.get("stage") != "autoencoder":
        raise _bad_path(p, "is a ddpmlab run but not an autoencoder run (its config.yaml has no stage: autoencoder)")
    cfg = config_from_dict(raw, source=str(p / "config.yaml"))
    stats_file = p / AE_STATS_FILE
    if not stats_file.is_file():
        raise ConfigError(f"model.autoencoder '{p}': the autoencoder run has no {AE_STATS_FILE} yet (it is written "
                          f"when training ends); finish it with `ddpm train-autoencoder --resume {p}`")
    try:
        stats = json.loads(stats_file.read_text())
        scale, shift = float(stats["scale_factor"]), float(stats["shift_factor"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.autoencoder '{p}': its {AE_STATS_FILE} is damaged ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:100]}); measure it again with "
                          f"`ddpm train-autoencoder --resume {p}`") from None
    a = cfg.autoencoder
    channels = int(cfg.data.channels) if cfg.data.dataset == "folder" else 1
    return AutoencoderSource("run", p, channels, int(a.latent_channels), 2 ** (len(a.block_out_channels) - 1),
                             scale, shift, stats)


def _describe_diffusers(p: Path) -> AutoencoderSource:
    try:
        c = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise _bad_path(p, "has a config.json that is not valid JSON") from None
    if not isinstance(c, dict) or c.get("_class_name") != "AutoencoderKL":
        name = c.get("_class_name") if isinstance(c, dict) else None
        raise _bad_path(p, f"has a config.json of {name or 'no diffusers class'}, not AutoencoderKL")
    if not any((p / n).is_file() for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
        raise _bad_path(p, "has config.json but no weights (diffusion_pytorch_model.safetensors)")
    blocks = c.get("block_out_channels", [64])
    return AutoencoderSource("diffusers", p, int(c.get("in_channels", 3)), int(c.get("latent_channels", 4)),
                             2 ** (len(blocks) - 1), float(c.get("scaling_factor", 0.18215)),
                             float(c.get("shift_factor") or 0.0))


def latent_shape(cfg, image_shape) -> tuple:
    """The denoiser's sample shape (c, H/f, W/f) of a latent run whose images are ``image_shape`` (C, H, W)."""
    src = describe_autoencoder(cfg.model.autoencoder)
    c, h, w = image_shape
    if src.in_channels != c:
        raise ConfigError(f"model.autoencoder '{cfg.model.autoencoder}' takes {src.in_channels}-channel images but "
                          f"the data has {c} (data.channels); use an autoencoder trained on such images")
    if h % src.downsampling or w % src.downsampling:
        raise ConfigError(f"model.autoencoder '{cfg.model.autoencoder}' downsamples by {src.downsampling}: the "
                          f"image size {h}x{w} must be a multiple of it (data.image_size)")
    return src.latent_shape(image_shape)


def latent_cache_key(data_key: str, codec_identity: str) -> str:
    """sha256 of (cache version, the dataset's content hash, the autoencoder's weights and scaling)."""
    return hashlib.sha256(f"{LATENT_CACHE_VERSION}|{data_key}|{codec_identity}".encode()).hexdigest()[:32]


def file_sha256(path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime): a weights file is hashed once."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def encode_batches(encode: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int = 64,
                   bar=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, c, h, w) float32 on the CPU, labels (N,)) of every example of ``dataset``, in order."""
    zs, ys = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([it[0] for it in items])
        zs.append(encode(x).cpu())
        ys.append(torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64))
        if bar is not None:
            bar.update(len(items))
    return torch.cat(zs), torch.cat(ys)


def cached_latents(cache_file: Path, encode_all: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
                   count: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """(latents, labels, from_cache): read ``cache_file``, or call ``encode_all()`` and write it atomically.

    A cache entry that is damaged, or that does not hold ``count`` latents with one label each, is
    recomputed."""
    cache_file = Path(cache_file)
    if cache_file.is_file():
        try:
            t = load_file(str(cache_file))
            z, y = t["latents"], t["labels"]
            if z.ndim >= 2 and y.shape == (len(z),) and (count is None or len(z) == count):
                return z, y, True
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            pass
    z, y = encode_all()
    atomic_save_tensors({"latents": z, "labels": y}, cache_file)
    return z, y, False
