"""LoRA adapter files: RUN/adapter.safetensors written, read, checked and applied to a network.

An adapter file holds only the adapters' tensors, in peft's layout (``<module>.lora_A.weight`` of shape
(r, in[, kh, kw]) and ``<module>.lora_B.weight`` (out, r[, 1, 1]) for each adapted layer), and in its
safetensors metadata ``format: ddpmlab-lora``, the rank, alpha (the update is scaled by alpha / r, Hu et al.
2022), the layers it targets and the base it was trained from.  A file without alpha (another tool's) is read
with alpha = r, a scale of 1.  ``ADAPTER[:SCALE]`` (the ``--lora`` option) multiplies the update by SCALE, so
that several adapters combine as W_0 + sum_i SCALE_i (alpha_i / r_i) B_i A_i.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.errors import DDPMError
from ddpmlab.models.lora import merge_adapter

ADAPTER_FILE = "adapter.safetensors"
FORMAT = "ddpmlab-lora"


def save_adapter(path, state: Dict[str, torch.Tensor], rank: int, alpha: float, targets: Sequence[str],
                 base: str) -> Path:
    """Write the adapter tensors ``state`` (only ``lora_A`` / ``lora_B`` weights) with their metadata, atomically."""
    odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise ValueError(f"an adapter file holds adapter tensors only, got {odd[0]}")
    meta = {"format": FORMAT, "rank": str(rank), "alpha": repr(float(alpha)), "target_modules": json.dumps(
        list(targets)), "base": str(base)}
    return atomic_save_tensors(state, path, metadata=meta)


def read_adapter(path) -> Tuple[Dict[str, torch.Tensor], float]:
    """(adapter tensors, alpha / r) of an adapter file; anything else is one DDPMError line naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise DDPMError(f"adapter '{path}' does not exist; give the adapter.safetensors of a LoRA run "
                        "(ddpm finetune SRC --method lora), or the run folder itself")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DDPMError(f"adapter '{path}' is not a safetensors file ({' '.join(str(e).split())[:120]})") from None
    odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd or not state:
        what = f"tensor '{odd[0]}' is no lora_A / lora_B weight" if odd else "it holds no tensor"
        raise DDPMError(f"adapter '{path}' is not a LoRA adapter: {what}")
    for key in state:
        other = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        if other not in state:
            raise DDPMError(f"adapter '{path}' is incomplete: it has {key} but not {other}")
    rank = next(v.shape[0] for k, v in sorted(state.items()) if k.endswith(".lora_A.weight"))
    try:
        alpha = float(meta.get("alpha", rank))
    except ValueError:
        raise DDPMError(f"adapter '{path}': its metadata alpha {meta['alpha']!r} is not a number") from None
    return state, alpha / rank


def parse_adapter_option(text: str) -> Tuple[Path, float]:
    """``ADAPTER[:SCALE]`` -> (path, scale); a tail after the last ':' that is no number belongs to the path."""
    head, sep, tail = str(text).rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def apply_adapters(model: nn.Module, options: Sequence[str], target: str) -> List[str]:
    """Bake the adapters of ``options`` (``ADAPTER[:SCALE]`` each, :func:`parse_adapter_option`) into ``model``'s
    weights, in order; ``target`` names the model in errors (e.g. "run 'runs/mnist-...'").  Returns one
    'path x scale' line per adapter."""
    done = []
    for option in options:
        path, scale = parse_adapter_option(option)
        state, scaling = read_adapter(path)
        merge_adapter(model, state, scale * scaling, f"'{path}'", target)
        done.append(f"{path} x {scale:g}")
    return done
