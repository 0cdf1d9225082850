"""The weights of a text DiT (PixArt-alpha's blocks) between ddpmlab and diffusers' ``PixArtTransformer2DModel``.

ddpmlab's :class:`~ddpmlab.models.dit_text.TextDiT` has the layers of ``PixArtTransformer2DModel``
(``norm_type="ada_norm_single"``, without the resolution and aspect-ratio embeddings), renamed::

    ours                                    diffusers
    patch_embed                             pos_embed.proj      (pos_embed: recomputed by diffusers)
    time_embed.0 / .2                       adaln_single.emb.timestep_embedder.linear_1 / linear_2
    t_block.1                               adaln_single.linear
    caption_embed.0 / .2                    caption_projection.linear_1 / linear_2
    blocks.{i}.attn{1,2}.to_q/k/v, to_out   transformer_blocks.{i}.attn{1,2}.to_q/k/v, to_out.0
    blocks.{i}.mlp.fc1 / fc2                transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    blocks.{i}.scale_shift_table            transformer_blocks.{i}.scale_shift_table
    final.scale_shift_table / linear        scale_shift_table / proj_out

Call it as ``transformer(x, encoder_hidden_states=tokens, encoder_attention_mask=mask, timestep=t)``.
"""

from __future__ import annotations

from typing import Dict

import torch

from ddpmlab.config import Config
from ddpmlab.errors import DDPMError
from ddpmlab.models.transformer import sincos_2d

_PREFIXES = [  # (ours, diffusers): a key's start
    ("patch_embed.", "pos_embed.proj."),
    ("time_embed.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("time_embed.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."), ("caption_embed.0.", "caption_projection.linear_1."),
    ("caption_embed.2.", "caption_projection.linear_2."), ("final.scale_shift_table", "scale_shift_table"),
    ("final.linear.", "proj_out."), ("blocks.", "transformer_blocks."),
]
_IN_BLOCK = [(".to_out.", ".to_out.0."), (".mlp.fc1.", ".ff.net.0.proj."), (".mlp.fc2.", ".ff.net.2.")]


def pixart_config(cfg: Config, model) -> dict:
    """PixArtTransformer2DModel's constructor arguments for ``model`` (a TextDiT), or a DDPMError naming the
    option that does not map."""
    if cfg.diffusion.prediction == "edm":
        raise DDPMError("diffusion.prediction=edm does not map: diffusers' schedulers have no EDM preconditioning "
                        "around a PixArtTransformer2DModel (train with prediction eps, x0 or v to export)")
    (h, w), hidden = model.image_size, model.hidden
    if h != w:
        raise DDPMError(f"a {h}x{w} DiT does not map: PixArtTransformer2DModel takes square inputs (sample_size); "
                        "train on square images to export")
    if model.blocks[0].mlp.fc1.out_features != 4 * hidden:
        raise DDPMError(f"dit.mlp_ratio={cfg.dit.mlp_ratio} does not map: PixArtTransformer2DModel's MLP is "
                        "4 x the token width (dit.mlp_ratio=4.0)")
    if model.num_classes or model.pooled_dim is not None:
        key = "model.num_classes" if model.num_classes else "dit.pooled_dim"
        raise DDPMError(f"{key} does not map: PixArtTransformer2DModel reads only the text tokens and the time "
                        f"(train without {key} to export)")
    heads = model.blocks[0].attn1.heads
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                out_channels=model.out_channels, num_layers=len(model.blocks), dropout=0.0,
                cross_attention_dim=hidden, attention_bias=True, sample_size=h, patch_size=model.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
                use_additional_conditions=False, caption_channels=model.context_dim)


def _rename(key: str, pairs: list, in_block: list) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            key = dst + key[len(src):]
            break
    for src, dst in in_block:
        key = key.replace(src, dst)
    return key


def to_pixart_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A TextDiT state dict under PixArtTransformer2DModel's keys (the fixed position embedding left out)."""
    return {_rename(k, _PREFIXES, _IN_BLOCK): v for k, v in state.items() if k != "pos_embed"}


def from_pixart_state_dict(state: Dict[str, torch.Tensor], grid: tuple) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`to_pixart_state_dict` for a TextDiT with a (H / p, W / p) token ``grid``."""
    back = [(b, a) for a, b in _PREFIXES]
    out = {_rename(k, back, [(b, a) for a, b in _IN_BLOCK]): v for k, v in state.items() if k != "pos_embed.pos_embed"}
    hidden = out["patch_embed.weight"].shape[0]
    out["pos_embed"] = sincos_2d(hidden, *grid)[None]
    return out
