"""The bridge to HF diffusers for a DiT: a ``DiTTransformer2DModel`` + ``DDPMScheduler`` folder.

A flow run's DiT is written with ``FlowMatchEulerDiscreteScheduler`` and a README.md holding its sampling
loop (:mod:`ddpmlab.io.diffusers_flow`).

:func:`ddpmlab.io.diffusers_bridge.export_diffusers` writes a DiT run with :func:`export_dit`;
a latent DiT run exports through :mod:`ddpmlab.io.latent_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from ddpmlab.config import Config, save_config
from ddpmlab.data import data_shape
from ddpmlab.errors import DDPMError
from ddpmlab.io.diffusers_flow import write_flow_card
from ddpmlab.io.diffusers_schedule import require_diffusers, run_scheduler
from ddpmlab.models.transformer import sincos_2d

# ddpmlab's DiT has the layers of diffusers' DiTTransformer2DModel (ada_norm_zero blocks); diffusers
# keeps a copy of the time and class embedders in every block (norm1.emb), ours are shared:
#     patch_embed                 pos_embed.proj        (pos_embed: recomputed by diffusers)
#     time_embed.0 / .2           transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / linear_2
#     class_embed                 transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
#     blocks.{i}.modulation       transformer_blocks.{i}.norm1.linear
#     blocks.{i}.attn.qkv / proj  transformer_blocks.{i}.attn1.to_q / to_k / to_v / to_out.0
#     blocks.{i}.mlp.fc1 / fc2    transformer_blocks.{i}.ff.net.0.proj / ff.net.2
#     final.modulation / linear   proj_out_1 / proj_out_2


def dit_transformer_config(cfg: Config, model) -> dict:
    """DiTTransformer2DModel's constructor arguments for ``model`` (a ddpmlab DiT), or a DDPMError naming the option."""
    if cfg.diffusion.prediction == "edm":
        raise DDPMError("diffusion.prediction=edm does not map: diffusers' schedulers have no EDM preconditioning "
                        "around a DiTTransformer2DModel (train with prediction eps, x0 or v to export)")
    if cfg.dit.context_dim is not None:
        raise DDPMError(f"dit.context_dim={cfg.dit.context_dim}: a DiT reading text has PixArt-alpha's blocks and maps "
                        "to PixArtTransformer2DModel (ddpmlab.io.diffusers_pixart), not to DiTTransformer2DModel")
    (h, w), hidden = model.image_size, model.hidden
    if h != w:
        raise DDPMError(f"a {h}x{w} DiT does not map: DiTTransformer2DModel takes square inputs (sample_size); "
                        "train on square images to export")
    if model.blocks[0].mlp.fc1.out_features != 4 * hidden:
        raise DDPMError(f"dit.mlp_ratio={cfg.dit.mlp_ratio} does not map: DiTTransformer2DModel's MLP is "
                        "4 x the token width (dit.mlp_ratio=4.0)")
    if model.time_shift != 1.0:
        raise DDPMError(f"a DiT with time_shift={model.time_shift} does not map: DiTTransformer2DModel's timestep "
                        "frequencies are 10000^(-k / (half - 1)) (time_shift=1)")
    if not torch.allclose(model.pos_embed[0], sincos_2d(hidden, *model.grid), atol=1e-6):
        raise DDPMError("the DiT's position embedding is not the fixed 2-D sin-cos one, which "
                        "DiTTransformer2DModel recomputes instead of loading; it does not map")
    heads = model.blocks[0].attn.num_heads
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                out_channels=model.out_channels, num_layers=len(model.blocks), dropout=0.0, attention_bias=True,
                sample_size=h, patch_size=model.patch_size, activation_fn="gelu-approximate",
                num_embeds_ada_norm=model.num_classes or 1,  # unconditional: one class whose embedding is 0
                upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6)


def to_diffusers_dit_state_dict(state: Dict[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """A ddpmlab DiT state dict under DiTTransformer2DModel's keys (the shared embedders copied into each block)."""
    out = {"pos_embed.proj.weight": state["patch_embed.weight"], "pos_embed.proj.bias": state["patch_embed.bias"],
           "proj_out_1.weight": state["final.modulation.weight"], "proj_out_1.bias": state["final.modulation.bias"],
           "proj_out_2.weight": state["final.linear.weight"], "proj_out_2.bias": state["final.linear.bias"]}
    hidden = state["patch_embed.weight"].shape[0]
    table = state.get("class_embed.weight", torch.zeros(2, hidden))  # unconditional: a zero "class" embedding
    names = {"modulation": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
             "mlp.fc2": "ff.net.2"}
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            for a, b in names.items():
                out[f"{theirs}{b}.{kind}"] = state[f"{ours}{a}.{kind}"]
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{theirs}attn1.{name}.{kind}"] = part.contiguous()
            for j in (1, 2):
                out[f"{theirs}norm1.emb.timestep_embedder.linear_{j}.{kind}"] = state[f"time_embed.{2 * j - 2}.{kind}"]
        out[f"{theirs}norm1.emb.class_embedder.embedding_table.weight"] = table
    return out


def dit_transformer(cfg: Config, model):
    """diffusers' DiTTransformer2DModel holding ``model``'s weights, checked to compute what it does (1e-5)."""
    theirs = require_diffusers().DiTTransformer2DModel(**dit_transformer_config(cfg, model))
    try:
        theirs.load_state_dict(to_diffusers_dit_state_dict(model.state_dict(), len(model.blocks)), strict=True)
    except (RuntimeError, KeyError) as e:
        raise DDPMError(f"the DiT does not map to DiTTransformer2DModel ({str(e).splitlines()[0]})") from None
    _check_same_dit_outputs(model, theirs.eval(), cfg)
    return theirs


def export_dit(cfg: Config, model, out: Path) -> Path:
    """Write a DiT as ``out/transformer`` (DiTTransformer2DModel) + ``out/scheduler`` (DDPMScheduler), safetensors.

    No ``DiTPipeline`` folder: that pipeline decodes latents with a VAE, which a DiT on pixels has not
    (a latent DiT run exports as one: :func:`ddpmlab.io.latent_export.export_latent_run`);
    load the parts with ``from_pretrained(out / "transformer")`` and ``DDPMScheduler.from_pretrained(out /
    "scheduler")``.  An unconditional DiT exports with one class of zero embedding (pass class_labels=0).
    Checks that the exported transformer computes what ours does (float32, tolerance 1e-5).  A flow run's
    scheduler is FlowMatchEulerDiscreteScheduler, and ``out/README.md`` holds its sampling loop.
    """
    theirs = dit_transformer(cfg, model)
    scheduler = run_scheduler(cfg)
    theirs.save_pretrained(str(out / "transformer"), safe_serialization=True)
    scheduler.save_pretrained(str(out / "scheduler"))
    save_config(cfg, out / "ddpmlab_config.yaml")  # provenance; diffusers ignores it
    if cfg.diffusion.process == "flow":
        write_flow_card(cfg, out, "transformer")
    return out


@torch.no_grad()
def _check_same_dit_outputs(ours, theirs, cfg: Config, atol: float = 1e-5) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *data_shape(cfg), generator=g)
    t = torch.tensor([10.0, cfg.diffusion.num_timesteps - 0.5])  # a flow's network time t * T is fractional
    k = cfg.model.num_classes
    y = torch.tensor([0, k]) if k else None
    a = ours(x, t, y)
    b = theirs(x, timestep=t, class_labels=y if k else torch.zeros(2, dtype=torch.long)).sample
    err = (a - b).abs().max().item()
    if not err <= atol * max(1.0, a.abs().max().item()):
        raise DDPMError(f"the exported DiTTransformer2DModel does not reproduce the model (max difference "
                        f"{err:.2e}); its architecture has an option the diffusers bridge does not map")
