"""A ControlNet between ddpmlab and diffusers' ``ControlNetModel``.

``ControlNetModel`` is the encoder half of ``UNet2DConditionModel`` with the control's parts, so a ControlNet maps
where its base maps to ``UNet2DConditionModel`` (a UNet with text cross-attention, ``unet.context_dim``; the plain
UNet's self-attention blocks have no place in it)::

    ours                                diffusers
    encoder.*                           the UNet's names (:mod:`ddpmlab.io.diffusers_bridge`): time_embedding,
                                        class_embedding, conv_in, down_blocks, mid_block
    hint.conv_in / blocks.{i} / conv_out  controlnet_cond_embedding.conv_in / blocks.{i} / conv_out
    zero_convs.{k}                      controlnet_down_blocks.{k}
    mid_out                             controlnet_mid_block

Call it as ``controlnet(x, t, encoder_hidden_states=tokens, controlnet_cond=control, class_labels=...)``; its
``down_block_res_samples`` and ``mid_block_res_sample`` are our residuals (``ControlNetModel`` takes no
cross-attention mask: its tokens are all read).

A ControlNet on a latent text run whose base exports as ``StableDiffusionPipeline`` (:mod:`ddpmlab.io.diffusers_text`:
a UNet on a frozen CLIP, DDPM, no classes, no pooled embedding) with a 3-channel control (the pipeline reads control
pictures as RGB) goes out as a ``StableDiffusionControlNetPipeline`` folder: the base's parts (vae, text_encoder,
tokenizer, unet, the DDIM "trailing" scheduler) beside ``controlnet/``, the ControlNetModel.  Then
``pipe(prompt, image=control, controlnet_conditioning_scale=s, num_inference_steps=N, guidance_scale=g)`` is
``ddpm sample BASE --controlnet CN --control picture.png --control-scale s --prompt ... --sampler ddim
--step-schedule trailing --steps N --guidance g``: the pipeline runs the ControlNet on the conditional and the
unconditional half alike, as :class:`~ddpmlab.models.controlnet.ControlledUNet` does under guidance.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import torch

from ddpmlab.config import Config, save_config
from ddpmlab.data import data_shape
from ddpmlab.errors import DDPMError
from ddpmlab.io.diffusers_bridge import (
    from_diffusers_state_dict,
    new_output_folder,
    to_diffusers_state_dict,
    unet2d_condition_config,
)
from ddpmlab.io.diffusers_schedule import require_diffusers
from ddpmlab.io.diffusers_text import (
    check_encoder,
    clip_text_model,
    text_pipeline,
    text_scheduler_config,
    unet2d_condition_model,
)
from ddpmlab.io.latent_export import exported_vae
from ddpmlab.models.autoencoder import LatentCodec
from ddpmlab.models.controlnet import ControlNet, check_fits
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_to_image import TextToImage

_PARTS = [("hint.", "controlnet_cond_embedding."), ("zero_convs.", "controlnet_down_blocks."),
          ("mid_out.", "controlnet_mid_block.")]  # (ours, diffusers), each a prefix
# UNet2DConditionModel's arguments that ControlNetModel does not take (the decoder's, and what only sampling reads)
_UNET_ONLY = ("sample_size", "out_channels", "up_block_types", "dropout", "time_embedding_type", "center_input_sample")


def to_diffusers_controlnet(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A ControlNet's state dict under ``ControlNetModel``'s keys."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    out = to_diffusers_state_dict(encoder)
    for key, value in state.items():
        for ours, theirs in _PARTS:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
    return out


def from_diffusers_controlnet(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers_controlnet`."""
    control = {k: v for k, v in state.items() if k.startswith(tuple(theirs for _, theirs in _PARTS))}
    out = {"encoder." + k: v for k, v in from_diffusers_state_dict(
        {k: v for k, v in state.items() if k not in control}).items()}
    for key, value in control.items():
        ours, theirs = next(p for p in _PARTS if key.startswith(p[1]))
        out[ours + key[len(theirs):]] = value
    return out


def controlnet_config(cfg: Config, controlnet: ControlNet) -> dict:
    """ControlNetModel's constructor arguments for the ControlNet of ``cfg``'s UNet, or a DDPMError saying why it
    does not map."""
    if cfg.unet.context_dim is None:
        raise DDPMError("diffusers' ControlNetModel mirrors UNet2DConditionModel (cross-attention blocks); this "
                        "ControlNet's base has no text cross-attention (unet.context_dim is null) and maps to "
                        "UNet2DModel, which has no ControlNet in diffusers, so it is not exported")
    conf = {k: v for k, v in unet2d_condition_config(cfg).items() if k not in _UNET_ONLY}
    return dict(conf, conditioning_channels=controlnet.control_channels,
                conditioning_embedding_out_channels=list(controlnet.hint_channels))


def controlnet_model(cfg: Config, controlnet: ControlNet):
    """diffusers' ControlNetModel holding ``controlnet``'s weights, checked to give its residuals (float32, 1e-4)."""
    theirs = require_diffusers().ControlNetModel(**controlnet_config(cfg, controlnet))
    try:
        theirs.load_state_dict(to_diffusers_controlnet(controlnet.state_dict()), strict=True)
    except RuntimeError as e:
        raise DDPMError(f"the ControlNet does not map to ControlNetModel ({str(e).splitlines()[0]})") from None
    _check_same_residuals(cfg, controlnet.eval(), theirs.eval())
    return theirs


@torch.no_grad()
def _check_same_residuals(cfg: Config, ours: ControlNet, theirs, atol: float = 1e-4) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *data_shape(cfg), generator=g)
    control = torch.rand(2, *ours.control_shape(x.shape), generator=g)
    tokens = torch.randn(2, 3, cfg.unet.context_dim, generator=g)
    t = torch.tensor([10.0, cfg.diffusion.num_timesteps - 0.5])
    y = torch.tensor([0, cfg.model.num_classes]) if cfg.model.num_classes else None
    pooled = torch.randn(2, cfg.unet.pooled_dim, generator=g) if cfg.unet.pooled_dim else None
    skips, mid = ours(x, t, y, TextCondition(tokens, None, pooled), control)
    out = theirs(x, t, encoder_hidden_states=tokens, controlnet_cond=control,
                 class_labels=pooled if pooled is not None else y)
    err = max((a - b).abs().max().item() for a, b in zip([*skips, mid], [*out.down_block_res_samples,
                                                                         out.mid_block_res_sample]))
    if not err <= atol * max(1.0, max(a.abs().max().item() for a in skips)):
        raise DDPMError(f"the exported ControlNetModel does not reproduce the ControlNet (max difference {err:.2e})")


def export_controlnet(cfg: Config, controlnet: ControlNet, out) -> Path:
    """Write ``controlnet`` (of the run whose config is ``cfg``) as a folder ``ControlNetModel.from_pretrained(out)``
    reads (safetensors), with the ddpmlab config beside it for provenance."""
    out = new_output_folder(out)
    controlnet_model(cfg, controlnet).save_pretrained(str(out), safe_serialization=True)
    save_config(cfg, out / "ddpmlab_config.yaml")  # diffusers ignores it
    return out


def pipeline_refusal(cfg: Config, controlnet: ControlNet) -> Optional[str]:
    """Why the ControlNet of run config ``cfg`` (its base's model, text and diffusion) gives no
    StableDiffusionControlNetPipeline, in one line; None where it does (the encoder's kind is checked once read)."""
    try:
        pipeline = text_pipeline(cfg)
    except DDPMError as e:
        return f"its base is no StableDiffusionPipeline: {e}"
    if pipeline != "StableDiffusionPipeline":
        return f"its base exports as {pipeline}, which has no ControlNet pipeline here"
    if controlnet.control_channels != 3:
        return (f"controlnet.control_channels is {controlnet.control_channels}, but StableDiffusionControlNetPipeline "
                "reads control pictures as RGB (3 channels)")
    return None


def export_controlnet_pipeline(cfg: Config, controlnet: ControlNet, base: TextToImage, codec: LatentCodec,
                               out, base_name: str) -> Path:
    """Write ``controlnet`` (run config ``cfg``) with its base (``base``, the base run's TextToImage, and ``codec``,
    its autoencoder) as a ``StableDiffusionControlNetPipeline`` folder (safetensors; ``out/controlnet`` is the
    ControlNetModel), each part checked to compute what ddpmlab's does first (float32, 1e-4); returns ``out``."""
    why = pipeline_refusal(cfg, controlnet)
    if why:
        raise DDPMError(f"the ControlNet does not map to StableDiffusionControlNetPipeline: {why}")
    encoder = base.encoder
    check_encoder(cfg, encoder)
    check_fits(controlnet, base.denoiser, "this ControlNet", base_name)
    diffusers = require_diffusers()
    tokenizer = copy.deepcopy(encoder.tokenizer)
    tokenizer.model_max_length = int(cfg.text.max_length)  # prompts cut where the run cuts them
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=exported_vae(codec), text_encoder=clip_text_model(encoder), tokenizer=tokenizer,
        unet=unet2d_condition_model(cfg, base.eval()), controlnet=controlnet_model(cfg, controlnet),
        scheduler=diffusers.DDIMScheduler.from_config(text_scheduler_config(cfg)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    out = new_output_folder(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    save_config(cfg, out / "ddpmlab_config.yaml")  # provenance; diffusers ignores it
    return out
