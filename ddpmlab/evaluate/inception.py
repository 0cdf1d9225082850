"""The FID Inception-v3 network (Szegedy et al. 2016; the 2015-12-05 TensorFlow graph of Heusel et al.).

Only the architecture lives here; the weights come from a file the user already has:
``pt_inception-2015-12-05-6726825d.pth`` (the pytorch-fid release), or the same tensors
as ``.safetensors``.  Nothing is downloaded.  Layer names follow that file, so it loads
as is.  The FID variant differs from the ImageNet classifier in its pooling: average
pools exclude padding, and the last block takes a max pool in its pool branch.

Input: images in [-1, 1] (B, C, H, W) with C in {1, 3}; they are resized to 299x299
(bilinear) and grey images repeated to 3 channels.  ``features``: (B, 2048) after the
global average pool; ``classify``: the 1008 logits without bias (the "unbiased" logits of
the Inception Score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ddpmlab.errors import OPTION, DDPMError, OptionError
from ddpmlab.io.weights import file_sha256, load_state_dict_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
GET_WEIGHTS = (f"get {WEIGHTS_NAME} (the FID Inception weights released with pytorch-fid, "
               "github.com/mseitzer/pytorch-fid/releases) on a machine with internet and give its path; "
               "for MNIST digits the shipped classifier needs no download")


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: the unit every branch is made of."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # 3x3 average pool, stride 1, that ignores the zero padding (as the TF graph does)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(c_in, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 480 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1) -> 768 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1 = Conv(c_in, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, **row), Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(c_in, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = Conv(c7, c7, **col), Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = Conv(c7, c7, **col), Conv(c7, 192, **row)
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 512 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(c_in, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs -> 2048 channels; ``max_pool`` in the last one."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> 2048 pool features; ``classify`` -> 1008 logits."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise DDPMError(f"the Inception extractor takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.fc.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def _read_state_dict(path: Path) -> dict:
    """Tensors of the weights file (safetensors, or torch.load(weights_only=True): no code runs)."""
    try:
        return load_state_dict_file(path)
    except DDPMError as e:
        raise OptionError("inception_weights", f"{OPTION}: {e}; {GET_WEIGHTS}") from None


def load_fid_inception(path: Optional[Union[str, Path]]) -> Tuple[FIDInceptionV3, str]:
    """(network in eval mode, sha256 of the file) from a local weights file; otherwise an OptionError
    about 'inception_weights' that says what is wrong with it and where to get the file."""
    if not path:
        raise OptionError("inception_weights", f"the Inception extractor needs the FID Inception-v3 weights (a "
                                               f"local file given as {OPTION}): {GET_WEIGHTS}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError("inception_weights", f"{OPTION} '{path}' does not exist; {GET_WEIGHTS}")
    sd = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()
          if not k.startswith("AuxLogits.")}
    net = FIDInceptionV3()
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        raise OptionError("inception_weights", f"{OPTION} '{path}' does not fit the FID Inception-v3 network "
                                               f"({' '.join(str(e).split())[:160]}); {GET_WEIGHTS}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        bad = (missing or unexpected)[:3]
        raise OptionError("inception_weights", f"{OPTION} '{path}' does not match the FID Inception-v3 network "
                                               f"({'missing' if missing else 'unexpected'} keys such as "
                                               f"{', '.join(bad)}); {GET_WEIGHTS}")
    return net.eval(), file_sha256(path)
