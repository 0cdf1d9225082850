"""Low-rank adapters (LoRA, Hu et al. 2022) on a denoiser.

An adapted layer computes h = W_0 x + (alpha / r) B A x (Hu et al. 2022, Eq. 3) with A (r, in) and
B (out, r); a convolution's A is a convolution with W_0's kernel and B a 1x1 one, so that B A is a
weight of W_0's shape.  B starts at zero: a fresh adapter leaves the network's output unchanged.

* :func:`lora_targets`: the Linear and Conv2d layers that ``lora.target_modules`` names by the last
  part of their module name (default: the attention projections);
* :func:`add_lora`: peft injects the adapters in place (``peft.LoraConfig``, ``inject_adapter_in_model``)
  and freezes everything else; :func:`adapter_state`: the adapter tensors alone, in peft's layout
  (``<module>.lora_A.weight``, ``<module>.lora_B.weight``);
* :func:`lora_delta`: (alpha / r) B A as a weight; :func:`merged_state`: the state dict of a network
  with adapters as the plain network's (the adapters baked in); :func:`merge_adapter`: an adapter
  file's tensors added to a plain network's weights, after checking that they fit it.

peft (which imports transformers: seconds) is imported only by the functions that inject adapters.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ddpmlab.config import Config
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.models.unet import Upsample

# lora.target_modules null: the attention projections of the UNet's attention blocks (q, k, v fused in qkv) and
# of its transformer blocks (text runs); the names a model does not have are passed over
ATTENTION_PROJECTIONS = ("qkv", "proj_out", "to_q", "to_k", "to_v", "to_out")
ADAPTER_NAME = "default"  # peft's name of the one adapter a LoRA run trains
LAYERS = (nn.Linear, nn.Conv2d)


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def _layers(model: nn.Module):
    """(path, module) of the Linear and Conv2d layers that may get adapters: a text run's denoiser's (not its text
    encoder's), any other model's all."""
    scope = "denoiser." if isinstance(getattr(model, "denoiser", None), nn.Module) else ""
    return [(p, m) for p, m in model.named_modules() if p.startswith(scope) and isinstance(m, LAYERS)]


def layer_names(model: nn.Module) -> List[str]:
    """The distinct last names of the model's Linear and Conv2d layers (what lora.target_modules may name)."""
    return sorted({_leaf(p) for p, _ in _layers(model)})


def lora_targets(model: nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """The module paths of the Linear and Conv2d layers whose last name is in ``names`` (None: the attention
    projections there are), a text run's in its denoiser.  Every name given must find a layer; an upsampling
    convolution, which :class:`~ddpmlab.models.unet.Upsample` computes from its weights without calling it, is
    refused."""
    wanted = ATTENTION_PROJECTIONS if names is None else tuple(names)
    found = [p for p, _ in _layers(model) if _leaf(p) in wanted]
    missing = [n for n in wanted if names is not None and not any(_leaf(p) == n for p in found)]
    if missing or not found:
        what = f"'{missing[0]}'" if missing else f"none of {', '.join(wanted)}"
        raise ConfigError(f"lora.target_modules: {what} names no Linear or Conv2d layer of this "
                          f"{type(model).__name__}; its layers are named {', '.join(layer_names(model))}")
    upsampling = [p for p in found if isinstance(model.get_submodule(p.rpartition(".")[0]), Upsample)]
    if upsampling:
        raise ConfigError(f"lora.target_modules: '{_leaf(upsampling[0])}' names the upsampling convolution "
                          f"{upsampling[0]}, whose weights are applied without calling it (fast_ops.upsample_conv), "
                          "so an adapter there would do nothing; drop it")
    return found


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """Inject the adapters of the config's ``lora`` section into ``model`` (in place, through peft) and freeze
    every other parameter; returns ``model``.  Each A starts at peft's Kaiming-uniform draw (torch's global
    generator), each B at zero."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy (transformers): only when adapters are made

    lora = cfg.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_targets(model, lora.target_modules))
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors of a model with adapters (:func:`add_lora`), peft's layout, detached copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(alpha / r) B A as a weight (Hu et al. 2022, Eq. 3), in float64: a (r, in[, kh, kw]), b (out, r[, 1, 1])
    -> (out, in[, kh, kw])."""
    delta = b.double().flatten(1) @ a.double().flatten(1)  # (out, in * kh * kw)
    return scaling * delta.reshape(b.shape[0], *a.shape[1:])


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_0 + (alpha / r) B A, summed in float64 and rounded once to W_0's dtype."""
    return (weight.double() + lora_delta(a, b, scaling).to(weight.device)).to(weight.dtype)


def merged_state(state: Dict[str, torch.Tensor], scaling: float) -> Dict[str, torch.Tensor]:
    """The state dict of a network with peft adapters (``<m>.base_layer.weight``, ``<m>.lora_A.<name>.weight``, ...)
    as the plain network's, each adapted weight W_0 + scaling B A; a state without adapters is returned as it is."""
    if not any(is_adapter_key(k) for k in state):
        return state
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_adapter_key(k)}
    for key in (k for k in state if ".lora_A." in k):
        module = key.split(".lora_A.")[0]
        weight = f"{module}.weight"
        out[weight] = _merged(out[weight], state[key], state[key.replace(".lora_A.", ".lora_B.")], scaling)
    return out


def _fit_error(label: str, target: str, key: str, got: tuple, need: tuple, weight: str, shape: tuple) -> DDPMError:
    return DDPMError(f"adapter {label} was made for another base model: its {key} is {tuple(got)}, but {target}'s "
                     f"{weight} {tuple(shape)} needs {tuple(need)}; apply it to the run it was trained from")


def check_adapter(params: Dict[str, torch.Tensor], adapter: Dict[str, torch.Tensor], label: str,
                  target: str) -> List[str]:
    """The modules ``adapter`` adapts, each checked against the network's ``params`` (name -> tensor): a module it
    does not have, or the first adapter tensor (in name order) of a shape that does not fit, is a DDPMError."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in adapter})
    for module in modules:
        weight = params.get(f"{module}.weight")
        if weight is None or weight.dim() not in (2, 4):
            some = sorted(k.rsplit(".", 1)[0] for k, v in params.items() if k.endswith(".weight") and v.dim() in (2, 4))
            raise DDPMError(f"adapter {label} adapts layer '{module}', which {target} does not have: it was made for "
                            f"a model with other module names (this one's layers are named like {', '.join(some[:3])})")
    for key in sorted(adapter):
        module, part = key.rsplit(".lora_", 1)
        w, t = params[f"{module}.weight"], adapter[key]
        rank = adapter[f"{module}.lora_A.weight"].shape[0]
        need = (rank, *w.shape[1:]) if part.startswith("A") else (w.shape[0], rank, *[1] * (w.dim() - 2))
        if tuple(t.shape) != tuple(need):
            raise _fit_error(label, target, key, t.shape, need, f"{module}.weight", w.shape)
    return modules


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Dict[str, torch.Tensor], scaling: float, label: str,
                  target: str) -> int:
    """Add ``scaling`` B A of each adapted layer to a plain network's weights in place (the adapter checked first,
    :func:`check_adapter`); ``scaling`` is the user's scale times alpha / r.  Returns the number of layers changed."""
    params = dict(model.named_parameters())
    modules = check_adapter(params, adapter, label, target)
    for module in modules:
        w = params[f"{module}.weight"]
        w.copy_(_merged(w, adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"], scaling))
    return len(modules)
