"""A small MNIST classifier shipped with the package: features for a "classifier FID" on digits.

The weights (``ddpmlab/evaluate/assets/mnist_classifier.safetensors``, float16, ~0.3 MB) were made by
``benchmarks/train_mnist_classifier.py`` from the bundled MNIST ``train`` split; the metadata
of the file records the accuracy on the held-out ``test`` split (500 digits).

    >>> net = load_mnist_classifier()          # eval mode, parameters frozen
    >>> logits = net(x)                        # x: (B, 1, 28, 28) in [-1, 1] -> (B, 10)
    >>> feats = net.features(x)                # (B, 128), the penultimate layer

The network has BatchNorm and dropout, so it must be in eval mode when it extracts
features; :func:`load_mnist_classifier` returns it that way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ddpmlab.errors import DDPMError

WEIGHTS = Path(__file__).parent / "assets" / "mnist_classifier.safetensors"
IMAGE_SHAPE = (1, 28, 28)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # 3x3 convolution, batch norm, ReLU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MNISTClassifier(nn.Module):
    """A 5-layer CNN: 28x28 -> 14x14 -> 7x7 -> global average -> 128 features -> 10 logits.

    ``forward(x)``: x (B, 1, 28, 28) in [-1, 1] -> logits (B, 10).
    ``features(x)``: the same input -> (B, num_features) after the global average pool.
    """

    def __init__(self, width: int = 32, num_features: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics' FID/KID for custom extractors
        self.body = nn.Sequential(
            _conv_block(1, width), _conv_block(width, width), nn.MaxPool2d(2),
            _conv_block(width, 2 * width), _conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
            _conv_block(2 * width, num_features), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.metadata: Dict[str, str] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) in [-1, 1] -> (B, num_features)."""
        if x.shape[1:] != IMAGE_SHAPE:
            raise DDPMError(f"the MNIST classifier needs images of shape {IMAGE_SHAPE}, got {tuple(x.shape[1:])}")
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, num_features) -> logits (B, num_classes)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) in [-1, 1] -> logits (B, num_classes)."""
        return self.classify(self.features(x))


def save_classifier(model: nn.Module, path: Union[str, Path], metadata: Dict[str, object]) -> Path:
    """Write the weights as float16 safetensors (BatchNorm statistics too) with string metadata."""
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    path.chmod(0o644)  # package data: readable by everyone
    return path


def load_classifier(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> MNISTClassifier:
    """A classifier from a safetensors file written by :func:`save_classifier`, in eval mode and frozen."""
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"classifier weights '{path}' not found; reinstall ddpmlab or run "
                        "benchmarks/train_mnist_classifier.py to recreate them")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    config = json.loads(meta.get("config", "{}"))
    model = MNISTClassifier(**config)
    sd = load_file(str(path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    model.metadata = meta
    return model.to(device).eval().requires_grad_(False)


def load_mnist_classifier(device: Union[str, torch.device] = "cpu") -> MNISTClassifier:
    """The shipped MNIST classifier (eval mode, frozen): ``net(x) -> logits``, ``net.features(x)``.

    ``x``: (B, 1, 28, 28) in [-1, 1], the scale of :func:`ddpmlab.data.load_mnist`.
    ``net.metadata["test_accuracy"]`` is its accuracy on the held-out bundled test split.
    """
    return load_classifier(WEIGHTS, device)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``x`` (N, 1, 28, 28) whose argmax logit equals ``y`` (N,)."""
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)
