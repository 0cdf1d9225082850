"""``train.mixed_precision: auto``: bf16 where the hardware computes it natively, fp32 elsewhere.

bf16 halves the bytes a training step moves and, on hardware with bf16 arithmetic, runs the matrix
products faster than fp32.  Without it (x86 CPUs before AVX512-BF16, e.g. AVX2 only) PyTorch
emulates bf16 and a training step is much slower than in fp32 (docs/benchmarks.md has the measured
ratios).  So ``auto`` asks the hardware:

* CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp32;
* CPU: bf16 when the CPU has AVX512-BF16 or AMX-BF16 (x86, from /proc/cpuinfo or the
  ``cpu_flags`` given), or the ``bf16`` feature (64-bit Arm), else fp32;
* anything else (MPS): fp32.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch

MODES = ("auto", "no", "bf16", "fp16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 / AMX) and Arm (FEAT_BF16) names


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[set]:
    """The CPU's feature flags ('flags' on x86, 'Features' on Arm); None where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def native_bf16_on_cpu(flags: Optional[Iterable[str]]) -> Tuple[bool, str]:
    """(whether the CPU computes bf16 natively, why) from its feature flags."""
    if flags is None:
        return False, f"the {platform.machine() or 'CPU'}'s features could not be read"
    found = [f for f in NATIVE_BF16_FLAGS if f in set(flags)]
    if found:
        return True, f"the CPU computes bf16 natively: {', '.join(found)}"
    return False, "the CPU has no bf16 arithmetic (no avx512_bf16 or amx_bf16): bf16 would be emulated, far slower"


def resolve_precision(mode: str, device_type: str, flags: Optional[Iterable[str]] = None,
                      cuda_bf16: Optional[bool] = None) -> Tuple[str, str]:
    """(the mixed precision to train with: no | bf16 | fp16, the reason) for ``train.mixed_precision``.

    ``flags`` (the CPU's) and ``cuda_bf16`` default to this machine's; tests pass their own.
    """
    if mode != "auto":
        return mode, "train.mixed_precision"
    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return ("bf16", "auto: the GPU computes bf16") if ok else ("no", "auto: this GPU has no bf16 arithmetic")
    if device_type == "cpu":
        ok, why = native_bf16_on_cpu(cpu_flags() if flags is None else flags)
        return ("bf16" if ok else "no"), f"auto: {why}"
    return "no", f"auto: fp32 on {device_type}"


def describe_precision(precision: str) -> str:
    return {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}[precision]
