"""The weights of Stable Diffusion's transformer blocks between ddpmlab and diffusers.

A :class:`~ddpmlab.models.transformer.SpatialTransformer` maps one to one onto diffusers'
``Transformer2DModel`` (inside ``CrossAttnDownBlock2D``, ``CrossAttnUpBlock2D`` and
``UNetMidBlock2DCrossAttn``); inside a block the names differ in three places::

    ours                            diffusers
    blocks.{d}                      transformer_blocks.{d}
    blocks.{d}.attn{1,2}.to_out     transformer_blocks.{d}.attn{1,2}.to_out.0
    blocks.{d}.ff.proj / ff.out     transformer_blocks.{d}.ff.net.0.proj / ff.net.2
    norm, proj_in, proj_out         the same (proj_in/proj_out as 1x1 convs when use_linear_projection=False)

A transformer block is recognised in a state dict by its ``proj_in`` (the UNet's plain attention
blocks have none, in either layout).  Where the block sits (``down.1.attn.0.`` ->
``down_blocks.1.attentions.0.``) is renamed by the caller's rule, :mod:`ddpmlab.io.diffusers_bridge`'s.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Tuple

import torch

_INNER = [(".blocks.", ".transformer_blocks."), (".to_out.", ".to_out.0."), (".ff.proj.", ".ff.net.0.proj."),
          (".ff.out.", ".ff.net.2.")]  # (ours, diffusers) inside one block, applied in this order
_PROJECTION = re.compile(r"^(.*\.)?proj_in\.weight$")


def transformer_prefixes(keys) -> list:
    """The prefixes (e.g. ``down.1.attn.0.``) of the transformer blocks among state-dict ``keys``, longest first."""
    found = {m.group(1) or "" for m in map(_PROJECTION.match, keys) if m}
    return sorted(found, key=len, reverse=True)


def _inner_name(inner: str, to_diffusers: bool) -> str:
    name = "." + inner
    for ours, theirs in (_INNER if to_diffusers else _INNER[::-1]):
        name = name.replace(ours, theirs) if to_diffusers else name.replace(theirs, ours)
    return name[1:]


def _projection(inner: str, value: torch.Tensor) -> torch.Tensor:
    """proj_in/proj_out weights as Linear (C, C): a 1x1 conv's (C, C, 1, 1) flattened."""
    if inner in ("proj_in.weight", "proj_out.weight") and value.dim() == 4:
        return value.flatten(1)
    return value


def split_transformer_weights(state: Dict[str, torch.Tensor], rename_prefix: Callable[[str], str],
                              to_diffusers: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(the transformer blocks' weights renamed, the other weights as they are) of ``state``.

    ``to_diffusers``: from ddpmlab's names to diffusers' (else the reverse); ``rename_prefix`` renames where
    a block sits.  Weights leave as Linear (C, C) projections either way (``use_linear_projection=True``).
    """
    prefixes = transformer_prefixes(state)
    mapped, rest = {}, {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            rest[key] = value
            continue
        inner = key[len(prefix):]
        mapped[rename_prefix(prefix) + _inner_name(inner, to_diffusers)] = _projection(inner, value)
    return mapped, rest
