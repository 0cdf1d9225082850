"""A LoRA run's adapters as diffusers reads them: RUN/pytorch_lora_weights.safetensors.

diffusers' ``StableDiffusionPipeline.load_lora_weights(folder)`` (and ``UNet2DConditionModel.load_lora_adapter(file,
prefix="unet")``) reads peft's layout under diffusers' module names: ``unet.<module>.lora_A.weight`` (r, in) and
``unet.<module>.lora_B.weight`` (out, r), with the ``LoraConfig`` in the safetensors metadata
(``lora_adapter_metadata``, keys prefixed ``unet.``), as diffusers' own training scripts write them.

Each adapted layer of ddpmlab's UNet is renamed by the bridge's weight names (:mod:`ddpmlab.io.diffusers_bridge`,
:mod:`ddpmlab.io.diffusers_transformer`): ``down.1.attn.0.blocks.0.attn1.to_q`` is
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, ``to_out`` is ``to_out.0``.  A fused q/k/v
projection (``qkv``, the UNet's plain attention blocks) becomes three layers that share A, each with its rows
of B: to_q/k/v x = B_q A x, ... is the fused layer's update split by rows.  The scale alpha / r is multiplied
into B (in float64, rounded once) and the metadata says lora_alpha = r, so every diffusers version (those that
ignore the metadata take alpha = r) computes W_0 + (alpha / r) B A.  Written only for runs whose UNet maps to
``UNet2DConditionModel`` (a UNet with text cross-attention, :func:`~ddpmlab.io.diffusers_bridge.unet2d_condition_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.config import Config
from ddpmlab.errors import DDPMError
from ddpmlab.io.diffusers_bridge import to_diffusers_state_dict, unet2d_condition_config

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DENOISER = "denoiser."  # a text run's denoiser inside its TextToImage


def maps_to_unet2d_condition(cfg: Config) -> bool:
    """Whether the run's UNet maps to diffusers' UNet2DConditionModel."""
    if cfg.model.kind != "unet" or cfg.unet.context_dim is None:
        return False
    try:
        unet2d_condition_config(cfg)
    except DDPMError:
        return False
    return True


def diffusers_lora_state(adapter: Dict[str, torch.Tensor], scaling: float,
                         model_keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """ddpmlab adapter tensors (``[denoiser.]<module>.lora_A/B.weight``) -> ``unet.<diffusers module>.lora_A/B.weight``,
    ``scaling`` (alpha / r) multiplied into B.  ``model_keys``: the network's state-dict keys (where its transformer
    blocks are)."""
    probe = {k.removeprefix(DENOISER): torch.empty(0) for k in model_keys if k.endswith("proj_in.weight")}
    out = {}
    for key in sorted(k for k in adapter if k.endswith(".lora_A.weight")):
        module = key[:-len(".lora_A.weight")]
        a, b = adapter[key], adapter[f"{module}.lora_B.weight"]
        if a.dim() != 2:
            raise DDPMError(f"adapter layer '{module}' is a convolution; diffusers' UNet2DConditionModel LoRA layout "
                            "here holds linear layers (lora.target_modules: the attention projections)")
        b = (b.double() * scaling).to(b.dtype)
        named = to_diffusers_state_dict({**probe, f"{module.removeprefix(DENOISER)}.weight": b})
        for theirs, part in named.items():
            if part.numel() == 0:  # a probe, not this layer
                continue
            layer = theirs[:-len(".weight")]
            out[f"unet.{layer}.lora_A.weight"] = a.contiguous()
            out[f"unet.{layer}.lora_B.weight"] = part.contiguous()
    return out


def save_diffusers_lora(run_dir, adapter: Dict[str, torch.Tensor], cfg: Config,
                        model_keys: Iterable[str]) -> Optional[Path]:
    """RUN/pytorch_lora_weights.safetensors for a run whose UNet maps to UNet2DConditionModel (else None)."""
    if not maps_to_unet2d_condition(cfg) or any(v.dim() != 2 for v in adapter.values()):
        return None
    lora = cfg.lora
    state = diffusers_lora_state(adapter, lora.alpha / lora.rank, model_keys)
    targets = sorted({k[len("unet."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    config = {"r": lora.rank, "lora_alpha": lora.rank, "lora_dropout": lora.dropout, "target_modules": targets,
              "init_lora_weights": True, "use_dora": False, "lora_bias": False}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()},
                                                                 sort_keys=True)}
    return atomic_save_tensors(state, Path(run_dir) / DIFFUSERS_LORA_FILE, metadata=meta)
