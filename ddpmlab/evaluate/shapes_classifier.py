"""A small classifier of the coloured-shapes set shipped with the package: features for a "classifier FID" on it.

FID with the Inception-v3 network needs weights nobody has offline; on the digits the toolkit reports a
"classifier FID" on the features of a shipped MNIST classifier (:mod:`ddpmlab.evaluate.classifier`).  This is
the same for the bundled captioned set (:mod:`ddpmlab.data.shapes`): a CNN that reads 3x32x32 images of the
set and says each of the four attributes (size, colour, shape, position) with its own head; its penultimate layer
(128 features) is what FID compares, and the class probability of a ``size-colour-shape-position`` class is the
product of its four attributes' probabilities (the logits of ``ddpm eval``'s is and acc).

The weights (``assets/shapes_classifier.safetensors``, float16) are made by ``benchmarks/train_shapes_classifier.py``
from images the generator draws afresh for every batch, of all 432 classes (the classes a text run's training
folder holds out included); the file's metadata records its accuracy on a held-out draw and the FID of real images,
noise, black images and colour-swapped images against real ones.

    >>> net = load_shapes_classifier()            # eval mode, parameters frozen
    >>> heads = net.attribute_logits(net.features(x))   # x (B, 3, 32, 32) in [-1, 1] -> {"size": (B, 2), ...}
    >>> net.features(x)                           # (B, 128)

Unlike the MNIST classifier it does not average its last feature map away: a global average would forget where
the shape is, and position is one of the attributes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ddpmlab.data.shapes import ATTRIBUTES, VALUES, parse_class_name
from ddpmlab.data.shapes_folder import SPEC_FILE
from ddpmlab.errors import OPTION, DDPMError, OptionError

WEIGHTS = Path(__file__).parent / "assets" / "shapes_classifier.safetensors"
IMAGE_SHAPE = (3, 32, 32)
HEAD_SIZES = {a: len(VALUES[a]) for a in ATTRIBUTES}  # size 2, colour 6, shape 4, position 9


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # 3x3 convolution, batch norm, ReLU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ShapesClassifier(nn.Module):
    """Six 3x3 convolutions (w, w, 2w, 2w, 4w, 4w channels), a 2x2 max-pool after each pair: 32x32 -> 4x4;
    the 4x4 map flattened -> a linear layer, batch norm, ReLU: ``num_features`` features -> one linear head per
    attribute (2 sizes, 6 colours, 4 shapes, 9 positions: 21 logits, :data:`~ddpmlab.data.shapes.VALUES` order).

    ``features(x)``: x (B, 3, 32, 32) in [-1, 1] -> (B, num_features); ``attribute_logits(features)`` ->
    {attribute: (B, its values)}; ``classify(features)`` -> (B, K): log p(class) = the sum of the four
    attributes' log-softmax of the classes :attr:`classes` (default all 432, :class:`ShapesSpec` order).
    """

    def __init__(self, width: int = 16, num_features: int = 128, dropout: float = 0.2):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics' FID for custom extractors
        w = width
        self.body = nn.Sequential(
            _conv_block(3, w), _conv_block(w, w), nn.MaxPool2d(2),  # 32 -> 16
            _conv_block(w, 2 * w), _conv_block(2 * w, 2 * w), nn.MaxPool2d(2),  # -> 8
            _conv_block(2 * w, 4 * w), _conv_block(4 * w, 4 * w), nn.MaxPool2d(2),  # -> 4
            nn.Flatten(), nn.Linear(4 * w * 16, num_features, bias=False), nn.BatchNorm1d(num_features), nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, sum(HEAD_SIZES.values()))
        self.metadata: Dict[str, str] = {}
        self.set_classes(None)

    def set_classes(self, names: Optional[Sequence[str]]) -> "ShapesClassifier":
        """Which classes ``classify`` gives logits of, in this order: shapes class names
        (``large-red-circle-top-left``; a data folder's ``class_names``); None: every class of the set.
        A name that is no shapes class is an OptionError about 'extractor'."""
        if names is None:
            index = torch.cartesian_prod(*(torch.arange(n) for n in HEAD_SIZES.values()))  # size varies slowest
        else:
            try:
                attrs = [parse_class_name(name) for name in names]
            except DDPMError as e:
                raise OptionError("extractor", f"{OPTION} shapes knows the classes of `ddpm data shapes` folders "
                                               f"only: {e}; choose another extractor") from None
            index = torch.tensor([[VALUES[a].index(t[a]) for a in ATTRIBUTES] for t in attrs],
                                 dtype=torch.long).reshape(-1, len(ATTRIBUTES))
        self.classes = index  # (K, 4): each class's value index per attribute
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 32, 32) in [-1, 1] -> (B, num_features)."""
        if tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise DDPMError(f"the shapes classifier needs images of shape {IMAGE_SHAPE}, got {tuple(x.shape[1:])}")
        return self.body(x)

    def attribute_logits(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """features (B, num_features) -> {"size": (B, 2), "colour": (B, 6), "shape": (B, 4), "position": (B, 9)}."""
        parts = self.head(self.dropout(features)).split(list(HEAD_SIZES.values()), dim=1)
        return dict(zip(ATTRIBUTES, parts))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, num_features) -> (B, K) log-probabilities of the classes :attr:`classes`: the attributes'
        log-softmax summed (the four heads' predictions taken as independent)."""
        heads = self.attribute_logits(features)
        index = self.classes.to(features.device)
        return sum(heads[a].log_softmax(1)[:, index[:, j]] for j, a in enumerate(ATTRIBUTES))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x (B, 3, 32, 32) in [-1, 1] -> the four heads' logits (:meth:`attribute_logits`)."""
        return self.attribute_logits(self.features(x))


def load_shapes_classifier(device: Union[str, torch.device] = "cpu", path: Union[str, Path] = WEIGHTS
                           ) -> ShapesClassifier:
    """The shipped classifier (or the file ``path``), in eval mode and frozen; ``net.metadata`` holds the file's
    (its accuracy on a held-out draw, the FIDs that show it can say "bad")."""
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"shapes classifier weights '{path}' not found; reinstall ddpmlab or run "
                        "benchmarks/train_shapes_classifier.py to recreate them")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    model = ShapesClassifier(**json.loads(meta.get("config", "{}")))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    model.metadata = meta
    return model.to(device).eval().requires_grad_(False)


def is_shapes_folder(data_path, sample_shape: Sequence[int]) -> bool:
    """Whether a run's data are the shapes set the classifier reads: 3x32x32 images of a folder with
    ``shapes.json`` (what ``ddpm data shapes`` writes)."""
    return tuple(sample_shape) == IMAGE_SHAPE and bool(data_path) and (Path(str(data_path)) / SPEC_FILE).is_file()


@torch.no_grad()
def attribute_accuracy(net: ShapesClassifier, x: torch.Tensor, targets: torch.Tensor,
                       batch_size: int = 500) -> Dict[str, float]:
    """Shares of images x (N, 3, 32, 32) whose predicted value is right per attribute and on all four at once:
    ``targets`` (N, 4) value indices (:data:`~ddpmlab.data.shapes.ATTRIBUTES` order)."""
    right = []
    for i in range(0, len(x), batch_size):
        heads = net(x[i:i + batch_size])
        right.append(torch.stack([heads[a].argmax(1) for a in ATTRIBUTES], 1) == targets[i:i + batch_size])
    ok = torch.cat(right)
    shares = {a: float(ok[:, j].float().mean()) for j, a in enumerate(ATTRIBUTES)}
    return {**shares, "all": float(ok.all(1).float().mean())}
