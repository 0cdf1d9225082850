"""Helpers that let one training step run on N processes, in micro-batches, in mixed precision.

The contract: ``train.batch_size`` is the global batch B of Algorithm 1 (Ho et al. 2020).
Each of the N processes (``accelerate launch`` / ``torchrun``) gets B / N examples of it,
splits them into ``train.grad_accum_steps`` = k micro-batches of B / (N k), and averages
the k gradients before the all-reduce averages over processes.  t and eps are drawn for
the whole global batch from (seed, step) and each process keeps its rows, so the update
is the same for every N and k up to float rounding (the order of the sums changes).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list

from ddpmlab.errors import ConfigError


def check_batch_split(batch_size: int, world: int, grad_accum_steps: int) -> int:
    """The micro-batch size B / (N k); ConfigError when B does not split evenly."""
    if batch_size % (world * grad_accum_steps):
        raise ConfigError(
            f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world}) times "
            f"train.grad_accum_steps ({grad_accum_steps}); e.g. train.batch_size="
            f"{world * grad_accum_steps * max(1, round(batch_size / (world * grad_accum_steps)))}"
        )
    return batch_size // (world * grad_accum_steps)


def check_mixed_precision(mode: str, device: str) -> None:
    """fp16 needs CUDA (its loss scaler is a CUDA feature); bf16 runs on CPU and GPU."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if mode == "fp16" and not cuda:
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (fp16 gradients need a loss scaler, which runs on CUDA); "
            "on this machine use train.mixed_precision=bf16 or no"
        )


def use_cpu(device: str) -> bool:
    """Whether train.device means the CPU; Accelerate runs several CPU processes (gloo) only when told so."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available() and not mps)


def forget_accelerator_precision() -> None:
    """Forget the mixed precision of an earlier Accelerator in this process (the process group stays).

    Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    another ``mixed_precision`` ("restart your runtime").  It has no public way to start
    over, so this is the one place that calls its private ``AcceleratorState._reset_state``
    (what Accelerate's own test cases do between tests); without it (a future version) a
    second train() in one process must use the same precision as the first.
    """
    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()


def process_state(device: str = "auto") -> PartialState:
    """This process among the training processes: ``.is_main_process``, ``.process_index``, ``.num_processes``.

    Accelerate's public PartialState, usable before the Accelerator exists (under torchrun /
    accelerate launch the first call sets up the process group, over gloo when ``device``,
    train.device, means the CPU); the Accelerator created later shares it, later calls return it.
    """
    return PartialState(cpu=use_cpu(device))


def agree_on(value, device: str):
    """Rank 0's ``value`` on every process (e.g. a run name from its clock); ``value`` itself with one process."""
    if process_state(device).num_processes <= 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def own_rows(n: int, rank: int) -> slice:
    """This process's rows ``rank * n .. (rank + 1) * n`` of the global batch (n rows per process)."""
    return slice(rank * n, (rank + 1) * n)


def draw_uniform(n: int, global_batch: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """U[0, 1) draws for this process's n rows, drawn for the global batch from the shared ``generator``
    (as :func:`draw_t_and_noise`), so any number of processes gets the same draws per example."""
    return torch.rand(global_batch, generator=generator, device=generator.device)[own_rows(n, rank)]


def draw_t_and_noise(sample_timesteps: Callable, x0: torch.Tensor, global_batch: int, rank: int,
                     generator: torch.Generator, offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """t (n,) and eps like ``x0`` (n, ...) for this process's rows ``rank * n .. (rank + 1) * n`` of the global batch.

    ``generator`` must be seeded identically on every process (by seed and step only).  ``offset``
    > 0 adds offset * N(0, 1) per image and channel of images (n, C, H, W) (offset noise).
    """
    rows = own_rows(x0.shape[0], rank)
    # Algorithm 1, lines 3-4: t ~ Uniform({1..T}), eps ~ N(0, I), for all B examples of the step
    t = sample_timesteps(global_batch, device=x0.device, generator=generator)[rows]
    noise = torch.randn((global_batch, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    if offset > 0 and x0.ndim == 4:  # Guttenberg 2023: a shift of each image's channel means
        shape = (global_batch, x0.shape[1], 1, 1)
        noise = noise + offset * torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise[rows]


def micro_batches(k: int, *tensors: Optional[torch.Tensor]) -> List[Sequence[Optional[torch.Tensor]]]:
    """Split equally long tensors into k aligned chunks along dim 0 (None stays None in every chunk)."""
    parts = [t.chunk(k) if t is not None else [None] * k for t in tensors]
    return list(zip(*parts))


def scaler_state(accelerator) -> dict:
    """The fp16 loss scaler's state for the checkpoint (scale, growth tracker); {} without a scaler."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return {}
    return {"grad_scaler": {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}}


def load_scaler_state(accelerator, state: dict) -> None:
    """Restore the loss scale of a checkpoint so that an fp16 run resumes exactly."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
