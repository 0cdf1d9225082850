"""Export a latent-diffusion run as one folder diffusers loads: the denoiser, its autoencoder, a scheduler.

- a latent UNet run -> ``LDMPipeline`` (unet, vqvae, scheduler; diffusers' unconditional latent
  pipeline: its "vqvae" slot takes an AutoencoderKL, it calls ``vqvae.decode(z / scaling_factor)``)
- a latent DiT run -> ``DiTPipeline`` (transformer, vae, scheduler, id2label; it decodes the same way)

The run's diffusion latents are ``z' = (mu - shift) * scale`` (:class:`~ddpmlab.models.autoencoder.LatentCodec`);
both pipelines undo only a scale, so the exported VAE carries ``scaling_factor = scale`` and the
shift is folded into its 1x1 convolutions: ``quant_conv``'s mean rows lose it (encode gives
mu - shift) and ``post_quant_conv`` gains W·shift in its bias (decode(z) = D(z + shift)) -- exact,
and checked on random latents.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ddpmlab.config import save_config
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import load_model
from ddpmlab.io.diffusers_bridge import new_output_folder, unet2d_model
from ddpmlab.io.diffusers_dit import dit_transformer
from ddpmlab.io.diffusers_schedule import require_diffusers, scheduler_config
from ddpmlab.models.autoencoder import LatentCodec


def exported_vae(codec: LatentCodec, atol: float = 1e-4):
    """A copy of ``codec``'s AutoencoderKL with scaling_factor = codec.scale and the shift folded in, so
    ``vae.decode(z' / vae.config.scaling_factor)`` equals ``codec.decode(z')`` (checked, float32)."""
    vae = copy.deepcopy(codec.autoencoder.vae).float().cpu().eval()
    shift, c = float(codec.shift), int(vae.config.latent_channels)
    if shift:
        if getattr(vae, "quant_conv", None) is None or getattr(vae, "post_quant_conv", None) is None:
            raise DDPMError(f"the autoencoder of {codec.source} has latent shift {shift:g} but no quant_conv/"
                            "post_quant_conv to fold it into; diffusers' LDM/DiT pipelines only undo a scale")
        with torch.no_grad():
            vae.quant_conv.bias[:c] -= shift  # the posterior mean's rows: mu - shift
            vae.post_quant_conv.bias += vae.post_quant_conv.weight.sum(dim=(1, 2, 3)) * shift
    vae.register_to_config(scaling_factor=float(codec.scale), shift_factor=None)
    z = torch.randn(2, c, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = codec.autoencoder.decode(z.to(codec.device) / codec.scale + shift).float().cpu()
        theirs = vae.decode(z / vae.config.scaling_factor).sample
    err = (ours - theirs).abs().max().item()
    if not err <= atol * max(1.0, ours.abs().max().item()):
        raise DDPMError(f"the exported AutoencoderKL does not decode as the run's codec does (max difference "
                        f"{err:.2e})")
    return vae


def export_latent_run(run_dir, out, codec: LatentCodec, which: str = "ema", adapters=()) -> Path:
    """Write the latent run ``run_dir`` (its ``which`` weights, LoRA ``adapters`` baked in) with ``codec`` (the
    run's model.autoencoder) as an ``LDMPipeline`` (UNet) or ``DiTPipeline`` (DiT) folder, safetensors; returns
    ``out``."""
    diffusers = require_diffusers()
    out = new_output_folder(out)
    cfg, model = load_model(run_dir, which, "cpu", adapters=adapters)
    if not cfg.model.autoencoder:
        raise DDPMError(f"{run_dir} is not a latent run (model.autoencoder is empty); export it with `ddpm export`")
    if cfg.diffusion.process == "flow":
        raise DDPMError(f"{run_dir} is a latent flow run: it does not export, since diffusers' LDMPipeline and "
                        "DiTPipeline call their scheduler's scale_model_input, which FlowMatchEulerDiscreteScheduler "
                        "has not; sample it with ddpm sample RUN")
    vae = exported_vae(codec)
    # the DDPM run's betas and parameterisation; no x0 clipping: latents have no fixed range
    scheduler = diffusers.DDIMScheduler.from_config({**scheduler_config(cfg), "clip_sample": False})
    if cfg.model.kind == "dit":
        k = cfg.model.num_classes
        id2label = {i: str(i) for i in range(k)} if k else {0: "unconditional"}
        pipe = diffusers.DiTPipeline(transformer=dit_transformer(cfg, model), vae=vae, scheduler=scheduler,
                                     id2label=id2label)
    else:
        if cfg.model.num_classes:
            raise DDPMError(f"{run_dir} is a class-conditional latent UNet; diffusers' LDMPipeline calls its UNet "
                            "without class labels, so it does not map (a class-conditional DiT exports as "
                            "DiTPipeline)")
        pipe = diffusers.LDMPipeline(vqvae=vae, unet=unet2d_model(cfg, model, run_dir), scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    save_config(cfg, out / "ddpmlab_config.yaml")  # provenance; diffusers ignores it
    return out
