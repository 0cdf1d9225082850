"""Weights from files without running code: safetensors, or PyTorch state dicts read with weights_only=True."""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import load_file

from ddpmlab.errors import DDPMError

_SAFE_SUFFIXES = (".safetensors",)
SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) can be made to run code before 2.6 (CVE-2025-32434)


def torch_loads_safely(version: Optional[str] = None) -> bool:
    """Whether this torch's (or torch ``version``'s) weights_only unpickler is one a crafted file cannot bypass."""
    parts = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    return parts is not None and (int(parts.group(1)), int(parts.group(2))) >= SAFE_TORCH


def _pickle_culprit(message: str) -> str:
    m = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+|class \S+)", message)
    return m.group(1).rstrip(".") if m else message.strip().splitlines()[0][:120]


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """Tensors of a user-supplied weights file: safetensors, or a PyTorch state dict.

    PyTorch files go through ``torch.load(weights_only=True)``: its unpickler builds only
    tensors and plain containers, so a file crafted to run code on load is refused
    (:class:`DDPMError`) before anything runs.  Nested ``{"state_dict": ...}`` /
    ``{"model": ...}`` / ``{"ema": ...}`` wrappers are unwrapped (EMA first).
    """
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"weights file '{path}' does not exist")
    if path.suffix.lower() in _SAFE_SUFFIXES:
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise DDPMError(f"weights file '{path}' is not a valid safetensors file "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not torch_loads_safely():
        raise DDPMError(f"refused to load '{path}': torch {torch.__version__} reads PyTorch files unsafely "
                        "(CVE-2025-32434); upgrade torch to 2.6 or newer, or give the weights as .safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices of the restricted unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DDPMError(
            f"refused to load '{path}': it is a pickle that asks to run code or build objects other than "
            f"tensors ({_pickle_culprit(str(e))}); ddpmlab loads only safetensors or plain PyTorch state dicts "
            "(torch.load weights_only=True). Re-save trusted weights with safetensors.torch.save_file"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise DDPMError(f"weights file '{path}' could not be read as safetensors or a PyTorch state dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj, path: Path) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("ema", "state_dict", "model") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise DDPMError(f"weights file '{path}' holds no state dict of tensors (found {type(obj).__name__}); "
                    "give a file saved from model.state_dict()")


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
