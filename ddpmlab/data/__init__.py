"""Datasets: bundled MNIST / digits, 2-D toy sets, image folders (with captions for a text run), sound folders;
image <-> uint8 helpers.

Every dataset returned by :func:`build_dataset` yields ``(x, y)`` pairs (x float32 in
[-1, 1] for images, y int64) and carries ``sample_shape`` (tuple), ``num_classes``
(int, 0 when unlabeled), ``is_image`` (bool) and ``class_names`` (list of str).  A sound folder
(``data.dataset: audio``) is an :class:`~ddpmlab.data.audio.AudioFolderDataset`: x (C, L) in [-1, 1], ``is_audio``
and ``sample_rate``; with ``data.representation: mel`` a :class:`~ddpmlab.data.audio_mel.MelImageDataset` of its
log-mel images (C, n_mels, frames), ``is_image`` and ``is_audio``.  A text run's image folder
(``text.encoder`` set) is a :class:`~ddpmlab.data.captions.CaptionedImageFolder`: ``(x, y, index)`` and
``captions``.  WebDataset shards (``data.dataset: webdataset``) are a :class:`~ddpmlab.data.stream.ShardStream`,
``streamed``: never indexed, batched by training step (``step_batches``; a text run's batches carry their captions).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ddpmlab.config import DATASETS
from ddpmlab.data.audio import AudioFolderDataset
from ddpmlab.data.audio_mel import MelImageDataset, mel_image_shape
from ddpmlab.data.bundled import load_digits, load_mnist, split_indices
from ddpmlab.data.captions import CaptionedImageFolder
from ddpmlab.data.images import IMAGE_EXTENSIONS, ImageFolderDataset, from_uint8, load_image, scan_folder, to_uint8
from ddpmlab.data.latents import latent_shape
from ddpmlab.data.stream import ShardStream
from ddpmlab.data.toy import TOY_NAMES, make_toy
from ddpmlab.errors import DataError

__all__ = [
    "InMemoryDataset", "TensorDataset", "ImageFolderDataset", "CaptionedImageFolder", "AudioFolderDataset",
    "ShardStream", "build_dataset", "data_shape", "image_shape",
    "load_mnist", "load_digits", "make_toy", "load_image", "training_image", "split_indices", "to_uint8", "from_uint8",
    "IMAGE_EXTENSIONS", "TOY_NAMES", "DATASETS",
]

_DIGIT_NAMES = [str(i) for i in range(10)]


class InMemoryDataset(torch.utils.data.Dataset):
    """Tensors held in memory: ``ds[i] == (x[i], y[i])``.

    ``x`` and ``y`` are public; index them with a tensor of indices to take a whole batch
    at once (``ds[idx]`` also works) instead of going through a DataLoader.
    """

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, is_image: bool,
                 class_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None):
        if y is None:
            y = torch.zeros(len(x), dtype=torch.int64)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x = x
        self.y = y.long()
        self.class_names = list(class_names or [])
        self.num_classes = int(num_classes if num_classes is not None else len(self.class_names))
        self.is_image = bool(is_image)
        self.sample_shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        return (f"InMemoryDataset({len(self)} samples, shape {self.sample_shape}, "
                f"num_classes {self.num_classes}, is_image {self.is_image})")


TensorDataset = InMemoryDataset  # the name used in the design notes


def data_shape(cfg) -> tuple:
    """The shape of one sample the denoiser sees, without loading any data: :func:`image_shape`, or for a
    latent run (``model.autoencoder``) the autoencoder's latent shape (c, H/f, W/f)."""
    if getattr(cfg.model, "autoencoder", None):
        return latent_shape(cfg, image_shape(cfg))
    return image_shape(cfg)


def image_shape(cfg) -> tuple:
    """The shape of one example of ``cfg.data`` (pixels of images, (2,) for points, (C, L) for sound)."""
    d = cfg.data
    if d.dataset == "mnist":
        return (1, 28, 28)
    if d.dataset == "digits":
        return (1, 8, 8)
    if d.dataset == "toy":
        return (2,)
    if d.dataset in ("folder", "webdataset"):
        size = list(d.image_size)
        if len(size) == 1:
            size = size * 2
        return (int(d.channels), int(size[0]), int(size[1]))
    if d.dataset == "audio":  # the waveform, or its log-mel image (data.representation=mel)
        return mel_image_shape(cfg) if d.representation == "mel" else (int(d.channels), int(d.length))
    raise DataError(f"data.dataset: unknown dataset '{d.dataset}'; choose one of {', '.join(DATASETS)}")


def build_dataset(cfg):
    """The dataset described by ``cfg.data`` (see the module docstring for its attributes)."""
    d = cfg.data
    if d.dataset == "mnist":
        x, y = load_mnist(d.split)
        return InMemoryDataset(x, y, is_image=True, class_names=_DIGIT_NAMES)
    if d.dataset == "digits":
        x, y = load_digits(d.split)
        return InMemoryDataset(x, y, is_image=True, class_names=_DIGIT_NAMES)
    if d.dataset == "toy":
        x = make_toy(d.toy, d.toy_samples, d.toy_noise, seed=cfg.train.seed)
        return InMemoryDataset(x, None, is_image=False, class_names=[], num_classes=0)
    if d.dataset == "folder":
        if not d.path:
            raise DataError("data.path: required when data.dataset is 'folder'; set it to a folder of images")
        size = list(d.image_size)
        if len(size) == 1:
            size = size * 2
        if cfg.text.encoder:  # a text run: the folder with its captions (images without one skipped)
            return CaptionedImageFolder(d.path, tuple(size), d.channels)
        return ImageFolderDataset(d.path, tuple(size), d.channels)
    if d.dataset == "webdataset":  # streamed: a text run's samples need a caption, a conditional run's a label
        if not d.path:
            raise DataError("data.path: required when data.dataset is 'webdataset'; set it to a folder of .tar shards "
                            "or a pattern such as shards/train-{000000..000099}.tar")
        return ShardStream(d.path, image_shape(cfg)[1:], d.channels, captions=bool(cfg.text.encoder),
                           num_classes=cfg.model.num_classes or 0, seed=cfg.train.seed)
    if d.dataset == "audio":
        if not d.path:
            raise DataError("data.path: required when data.dataset is 'audio'; set it to a folder of WAV, FLAC or "
                            "OGG files")
        sound = AudioFolderDataset(d.path, d.sample_rate, d.length, d.channels)
        return MelImageDataset(sound, cfg) if d.representation == "mel" else sound
    raise DataError(f"data.dataset: unknown dataset '{d.dataset}'; choose one of {', '.join(DATASETS)}")


def training_image(cfg, index: int) -> torch.Tensor:
    """Example ``index`` of ``cfg.data``'s images as (C, H, W) in [-1, 1].  An image folder is listed and only
    that one file decoded (in :class:`ImageFolderDataset`'s order, which skips unreadable files)."""
    d = cfg.data
    if d.dataset == "webdataset":
        raise DataError(f"training image {index}: the run's data are streamed shards ({d.path}), which have no "
                        "numbered images; give the image as a file instead")
    if d.dataset != "folder":
        data = build_dataset(cfg)
        _check_index(index, len(data))
        return data[index][0]
    if not d.path:
        raise DataError("data.path: required when data.dataset is 'folder'; set it to a folder of images")
    files = scan_folder(os.path.expanduser(str(d.path)))[0]
    _check_index(index, len(files))
    try:
        return from_uint8(load_image(files[index], image_shape(cfg)[1:], int(d.channels)))
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's
        raise DataError(f"training image {index} ('{files[index]}') cannot be read ({type(e).__name__}: "
                        f"{' '.join(str(e).split())}); choose another") from None


def _check_index(index: int, count: int) -> None:
    if not 0 <= index < count:
        raise DataError(f"training image {index} does not exist: the run's data has {count} images "
                        f"(0..{count - 1})")
