"""Feature extractors for FID/KID/IS/precision-recall, locked in eval mode, and batched extraction.

An :class:`Extractor` maps images in the data's scale ([-1, 1], (B, C, H, W)) to features
(B, D) and, when it is a classifier, to logits (B, K).  Two ship:

* ``classifier``: the bundled MNIST classifier (:mod:`ddpmlab.classifier`), 128 features,
  offline out of the box, for 1x28x28 digits ("classifier FID").
* ``inception``: the standard FID Inception-v3 network (2048 pool features, 1008 logits),
  only from a weights file the user has locally; nothing is ever downloaded.
* ``shapes``: the bundled coloured-shapes classifier (:mod:`ddpmlab.evaluate.shapes_classifier`), 128 features,
  offline, for 3x32x32 images of the shapes set; ``classifier`` means it where a run's data folder is a shapes
  set (it has ``shapes.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ddpmlab.errors import OPTION, DDPMError, OptionError, mention
from ddpmlab.evaluate.classifier import WEIGHTS, load_mnist_classifier
from ddpmlab.evaluate.inception import load_fid_inception
from ddpmlab.evaluate.shapes_classifier import WEIGHTS as SHAPES_WEIGHTS
from ddpmlab.evaluate.shapes_classifier import is_shapes_folder, load_shapes_classifier
from ddpmlab.io.weights import file_sha256
from ddpmlab.progress import progress_bar

EXTRACTORS = ("classifier", "inception", "shapes")


class Extractor(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> features (B, num_features); ``logits(x)`` -> (B, K).

    ``net`` provides ``features(x)`` and ``classify(features) -> logits``.
    The wrapped network is put in eval mode and ``train()`` cannot switch it back: batch
    norm and dropout in training mode would make a sample's features depend on its batch.
    ``identity`` names the network and the hash of its weights (used in cache keys).
    """

    def __init__(self, net: nn.Module, name: str, identity: str, num_features: int,
                 input_shape: Optional[Tuple[int, int, int]] = None, hint: str = ""):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.identity = identity
        self.num_features = num_features  # torchmetrics reads this for custom extractors
        self.input_shape = input_shape
        self.hint = hint  # what to do with other images (an OptionError's text: may mention options)

    def train(self, mode: bool = True) -> "Extractor":
        return super().train(False)  # locked in eval mode

    def check(self, x: torch.Tensor) -> None:
        if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
            raise OptionError("extractor", f"the '{self.name}' extractor needs images of shape {self.input_shape}, "
                                           f"got {tuple(x.shape[1:])}{self.hint}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.net.features(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classify(self(x))


def classifier_extractor(device: Union[str, torch.device] = "cpu") -> Extractor:
    """The shipped MNIST classifier as an extractor (128 features, 10 logits, 1x28x28 input)."""
    net = load_mnist_classifier(device)
    return Extractor(net, "classifier", f"mnist-classifier-{file_sha256(WEIGHTS)[:16]}", net.num_features,
                     input_shape=(1, 28, 28))


def shapes_extractor(class_names: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "cpu"
                     ) -> Extractor:
    """The shipped shapes classifier as an extractor (128 features, 3x32x32 input); its logits are the
    log-probabilities of the shapes classes ``class_names`` in their order (None: all 432 of the set)."""
    net = load_shapes_classifier(device).set_classes(class_names)
    return Extractor(net, "shapes", f"shapes-classifier-{file_sha256(SHAPES_WEIGHTS)[:16]}", net.num_features,
                     input_shape=(3, 32, 32))


def inception_extractor(weights: Optional[Union[str, Path]], device: Union[str, torch.device] = "cpu") -> Extractor:
    """The FID Inception-v3 network from a local weights file (2048 features, 1008 logits); a missing or
    wrong file is an OptionError about 'inception_weights'."""
    net, digest = load_fid_inception(weights)
    return Extractor(net.to(device), "inception", f"inception-v3-fid-{digest[:16]}", 2048)


def build_extractor(name: str, sample_shape: Tuple[int, ...], inception_weights: Optional[str] = None,
                    device: Union[str, torch.device] = "cpu", data=None) -> Extractor:
    """The extractor called ``name`` for images of ``sample_shape`` (C, H, W); an OptionError about
    'extractor' (or 'inception_weights') when it is unknown or cannot serve these images. ``data``: the run's
    data set; 'classifier' on a shapes folder's 3x32x32 images is the shapes classifier, whose logits follow
    the data's ``class_names``."""
    if name not in EXTRACTORS:
        raise OptionError("extractor", f"{OPTION} '{name}' is unknown; choose one of {', '.join(EXTRACTORS)}")
    if name == "inception":
        return inception_extractor(inception_weights, device)
    hint = f"; for other images use the Inception extractor ({mention('inception_weights')})"
    if name == "shapes" or is_shapes_folder(getattr(data, "root", None), sample_shape):
        if tuple(sample_shape) != (3, 32, 32):
            raise OptionError("extractor", f"the shapes extractor is for 3x32x32 images of `ddpm data shapes`, "
                                           f"these images are {tuple(sample_shape)}{hint}")
        extractor = shapes_extractor(getattr(data, "class_names", None) or None, device)
        extractor.hint = hint
        return extractor
    if tuple(sample_shape) != (1, 28, 28):
        raise OptionError("extractor", f"the classifier extractor is for 1x28x28 digits (and 3x32x32 shapes "
                                       f"folders), these images are {tuple(sample_shape)}{hint}")
    extractor = classifier_extractor(device)
    extractor.hint = hint
    return extractor


@torch.no_grad()
def extract(extractor: Extractor, images: Iterable[torch.Tensor], total: Optional[int] = None,
            with_logits: bool = False, device: Union[str, torch.device, None] = None, progress: bool = True,
            desc: str = "features") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Features (N, D) float32 on the CPU (and logits (N, K) when asked) of batches of images.

    ``images``: an iterable of (B, C, H, W) batches in [-1, 1]; ``total``: N, for the bar.
    """
    device = device if device is not None else next(extractor.parameters()).device
    extractor.eval()
    feats, logits = [], []
    with progress_bar(progress, total=total, desc=desc, unit="img", leave=False) as bar:
        for x in images:
            x = x.to(device, torch.float32)
            f = extractor(x)
            feats.append(f.float().cpu())
            if with_logits:
                logits.append(extractor.net.classify(f).float().cpu())
            bar.update(len(x))
    if not feats:
        raise DDPMError("no images to extract features from")
    return torch.cat(feats), (torch.cat(logits) if with_logits else None)


def batches(x: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Split (N, ...) into consecutive batches of at most ``batch_size``."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]
