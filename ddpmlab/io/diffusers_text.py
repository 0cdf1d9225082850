"""A latent text run as a diffusers text-to-image pipeline folder.

- a UNet with text cross-attention reading a frozen ``CLIPTextModel`` -> ``StableDiffusionPipeline``
  (Rombach et al. 2022: vae, text_encoder, tokenizer, unet, scheduler; safety_checker and feature_extractor
  None).  The UNet is ``UNet2DConditionModel`` (:func:`~ddpmlab.io.diffusers_bridge.unet2d_condition_config`);
  the pipeline calls CLIP without an attention mask and its UNet cross-attends to every token, padding
  included, as a ddpmlab CLIP run does (:mod:`ddpmlab.models.text_frozen`).  A ``CLIPTextModelWithProjection``
  is written as the ``CLIPTextModel`` inside it (the pipeline reads the tokens, never the projection).
- PixArt-alpha's DiT reading a frozen ``T5EncoderModel`` -> ``PixArtAlphaPipeline`` (Chen et al. 2023:
  tokenizer, text_encoder, vae, transformer, scheduler).  It passes T5's padding mask to the encoder and to
  the transformer, as ddpmlab does; it lower-cases and strips prompts first (``clean_caption=False``).

The autoencoder is the run's, with its latent shift folded in (:func:`~ddpmlab.io.latent_export.exported_vae`);
the scheduler is a ``DDIMScheduler`` with the run's betas and prediction type (no x0 clipping: latents have no
fixed range), so ``pipe(prompt, num_inference_steps=N, guidance_scale=g)`` is
``ddpm sample RUN --prompt ... --sampler ddim --step-schedule trailing --steps N --guidance g`` where N divides
diffusion.num_timesteps (:func:`text_scheduler_config`; classifier-free guidance from the empty prompt,
Ho & Salimans 2022, Eq. 6, on the network's output in both).  The tokenizer's
``model_max_length`` is written as ``text.max_length``, so prompts are cut where the run cuts them.

What does not map is refused in one line naming it (:func:`text_pipeline`, :func:`check_encoder`): the own
(GLIDE-style) encoder, pixel-space runs, flow runs, class labels, a pooled text embedding, a UNet on T5 or a DiT
on CLIP, a learned variance.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ddpmlab.config import Config, save_config
from ddpmlab.data import data_shape
from ddpmlab.errors import DDPMError
from ddpmlab.io.adapters import apply_adapters
from ddpmlab.io.checkpoint import load_run_config, load_weights
from ddpmlab.io.diffusers_bridge import new_output_folder, to_diffusers_state_dict, unet2d_condition_config
from ddpmlab.io.diffusers_pixart import pixart_config, to_pixart_state_dict
from ddpmlab.io.diffusers_schedule import require_diffusers, scheduler_config
from ddpmlab.io.latent_export import exported_vae
from ddpmlab.models.autoencoder import LatentCodec
from ddpmlab.models.text import OWN, build_text_encoder
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_frozen import FrozenTextEncoder
from ddpmlab.models.text_to_image import TextToImage, build_text_to_image, text_section

PIPELINES = {"unet": "StableDiffusionPipeline", "dit": "PixArtAlphaPipeline"}
ENCODERS = {"unet": ("CLIPTextModel", "CLIPTextModelWithProjection"), "dit": ("T5EncoderModel",)}
_WHAT_MAPS = ("a latent run (model.autoencoder) of a UNet on a frozen CLIPTextModel (StableDiffusionPipeline) or "
              "of a DiT on a frozen T5EncoderModel (PixArtAlphaPipeline)")


def text_pipeline(cfg: Config) -> str:
    """The diffusers pipeline a text run exports as, or a DDPMError naming the option that does not map
    (what the config says; the encoder's kind is checked by :func:`check_encoder` once it is read)."""
    t = cfg.text
    if not t.encoder:
        raise DDPMError("text.encoder is null: this is no text run; export it with `ddpm export` "
                        "(ddpmlab.io.diffusers_bridge / latent_export)")
    if t.encoder == OWN:
        raise DDPMError("text.encoder=own does not map: the run's own GLIDE-style encoder and word-level tokenizer "
                        "are no transformers model a diffusers pipeline loads; only " + _WHAT_MAPS + " exports")
    if not cfg.model.autoencoder:
        raise DDPMError("a pixel-space text run (model.autoencoder is empty) does not map: StableDiffusionPipeline "
                        "and PixArtAlphaPipeline denoise the latents of an AutoencoderKL; only " + _WHAT_MAPS +
                        " exports")
    if cfg.diffusion.process == "flow":
        raise DDPMError("diffusion.process=flow does not map: StableDiffusionPipeline and PixArtAlphaPipeline "
                        "multiply their first latents by scheduler.init_noise_sigma, which FlowMatchEulerDiscreteScheduler "
                        "has not; train with diffusion.process=ddpm to export")
    if cfg.model.num_classes:
        raise DDPMError(f"model.num_classes={cfg.model.num_classes} does not map: StableDiffusionPipeline and "
                        "PixArtAlphaPipeline pass no class labels; train a text run without model.num_classes")
    kind = cfg.model.kind
    if kind not in PIPELINES:
        raise DDPMError(f"model.kind={kind} does not map; only {_WHAT_MAPS} exports")
    section = text_section(cfg)
    pooled = getattr(cfg, section).pooled_dim
    if pooled is not None:
        raise DDPMError(f"{section}.pooled_dim={pooled} does not map: {PIPELINES[kind]} gives its denoiser the "
                        "token embeddings only, no pooled embedding (SD 1.x has none); train with "
                        f"{section}.pooled_dim=null to export")
    if kind == "unet" and cfg.diffusion.variance == "learned_range":
        raise DDPMError("diffusion.variance=learned_range does not map: StableDiffusionPipeline's schedulers "
                        "read a UNet output as wide as the latents; train with a fixed variance to export")
    return PIPELINES[kind]


def check_encoder(cfg: Config, encoder) -> None:
    """A DDPMError unless ``encoder`` (the run's frozen text encoder) is of a kind its pipeline reads."""
    kind = "dit" if cfg.model.kind == "dit" else "unet"
    got = getattr(encoder, "kind", type(encoder).__name__)
    if got in ENCODERS[kind]:
        return
    if kind == "unet":
        raise DDPMError(f"a UNet on a {got} (text.encoder={cfg.text.encoder}) does not map: StableDiffusionPipeline "
                        "reads a CLIPTextModel and gives its UNet no padding mask, which ddpmlab's UNet applies to "
                        "T5's tokens; a T5 run exports with model.kind=dit (PixArtAlphaPipeline)")
    raise DDPMError(f"a DiT on a {got} (text.encoder={cfg.text.encoder}) does not map: PixArtAlphaPipeline reads a "
                    "T5EncoderModel and masks the padding tokens that a ddpmlab CLIP run attends to; a CLIP run "
                    "exports with model.kind=unet (StableDiffusionPipeline)")


def text_model(cfg: Config, encoder, run_dir, which: str = "ema", adapters=()) -> TextToImage:
    """The run's TextToImage on ``encoder`` in eval mode on the CPU, its ``which`` weights, LoRA ``adapters``
    (``ADAPTER[:SCALE]``) baked in."""
    model = build_text_to_image(cfg, encoder)
    model.load_state_dict(load_weights(run_dir, which))
    apply_adapters(model, adapters, f"run '{run_dir}'")
    return model.eval()


def export_text_run(run_dir, out, codec: LatentCodec, which: str = "ema", adapters=()) -> Path:
    """Write the latent text run ``run_dir`` (its ``which`` weights, LoRA ``adapters`` baked in) with ``codec``
    (its model.autoencoder) as a ``StableDiffusionPipeline`` (UNet, CLIP) or ``PixArtAlphaPipeline`` (DiT, T5)
    folder, safetensors; returns ``out``.  Refuses in one line what does not map (module docstring), and checks
    that the exported denoiser, text encoder and VAE compute what the run's do (float32) before writing."""
    cfg = load_run_config(run_dir)
    pipeline = text_pipeline(cfg)
    encoder = build_text_encoder(cfg.text, run_dir)
    check_encoder(cfg, encoder)
    out = new_output_folder(out)
    model = text_model(cfg, encoder, run_dir, which, adapters)
    diffusers = require_diffusers()
    scheduler = diffusers.DDIMScheduler.from_config(text_scheduler_config(cfg))
    tokenizer = copy.deepcopy(encoder.tokenizer)
    tokenizer.model_max_length = int(cfg.text.max_length)  # the pipelines pad and cut to this length
    vae = exported_vae(codec)
    if pipeline == "StableDiffusionPipeline":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=clip_text_model(encoder), tokenizer=tokenizer,
            unet=unet2d_condition_model(cfg, model), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder.model, vae=vae,
                                             transformer=pixart_transformer(cfg, model), scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    save_config(cfg, out / "ddpmlab_config.yaml")  # provenance; diffusers ignores it
    return out


def text_scheduler_config(cfg: Config) -> dict:
    """DDIMScheduler's config for the run: its betas and parameterisation (:func:`scheduler_config`), no x0
    clipping (latents have no fixed range), "trailing" timesteps (Lin et al. 2024, Sec. 3.3: the first step at
    t = T - 1).  StableDiffusionPipeline rewrites any steps_offset to 1, which moves "leading" timesteps (but
    not "trailing" ones) off ddpmlab's; diffusers' DDIM steps from t to t - T // N, which is the next
    trailing timestep when the N steps divide T."""
    return {**scheduler_config(cfg), "clip_sample": False, "timestep_spacing": "trailing", "steps_offset": 1}


def clip_text_model(encoder: FrozenTextEncoder):
    """The encoder's CLIPTextModel (a CLIPTextModelWithProjection's text model without the projection), whose
    last hidden state is the run's token embeddings."""
    from transformers import CLIPTextModel

    if encoder.kind == "CLIPTextModel":
        return encoder.model
    clip = CLIPTextModel(encoder.model.config).eval()
    clip.text_model.load_state_dict(encoder.model.text_model.state_dict(), strict=True)
    return clip


def _random_text(cfg: Config, batch: int, masked: bool) -> tuple:
    """(x, t, TextCondition) to compare two denoisers on: latents, two timesteps, random tokens (the last
    tokens of row 1 padding when ``masked``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *data_shape(cfg), generator=g)
    t = torch.tensor([10.0, cfg.diffusion.num_timesteps - 1.0])[:batch]
    length = min(int(cfg.text.max_length), 8)
    tokens = torch.randn(batch, length, getattr(cfg, text_section(cfg)).context_dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if masked:
        mask[1, length // 2:] = False
    return x, t, TextCondition(tokens, mask if masked else None)


def _check_close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    err = (a - b).abs().max().item()
    if not err <= atol * max(1.0, a.abs().max().item()):
        raise DDPMError(f"the exported {what} does not reproduce the run's denoiser (max difference {err:.2e}); "
                        "its architecture has an option the diffusers bridge does not map")


@torch.no_grad()
def unet2d_condition_model(cfg: Config, model: TextToImage):
    """diffusers' UNet2DConditionModel holding the run's UNet, checked to compute what it does (float32, 1e-4)."""
    unet = require_diffusers().UNet2DConditionModel(**unet2d_condition_config(cfg)).eval()
    try:
        unet.load_state_dict(to_diffusers_state_dict(model.denoiser.state_dict()), strict=True)
    except RuntimeError as e:
        raise DDPMError(f"the UNet does not map to UNet2DConditionModel ({str(e).splitlines()[0]})") from None
    x, t, text = _random_text(cfg, 2, masked=False)  # the pipeline passes every token, padding included
    _check_close(model.denoiser(x, t, cond=text), unet(x, t, encoder_hidden_states=text.tokens).sample,
                 "UNet2DConditionModel")
    return unet


@torch.no_grad()
def pixart_transformer(cfg: Config, model: TextToImage):
    """diffusers' PixArtTransformer2DModel holding the run's text DiT, checked to compute what it does with a
    padding mask (float32, 1e-4)."""
    denoiser = model.denoiser
    theirs = require_diffusers().PixArtTransformer2DModel(**pixart_config(cfg, denoiser)).eval()
    try:
        theirs.load_state_dict(to_pixart_state_dict(denoiser.state_dict()), strict=True)
    except RuntimeError as e:
        raise DDPMError(f"the DiT does not map to PixArtTransformer2DModel ({str(e).splitlines()[0]})") from None
    x, t, text = _random_text(cfg, 2, masked=True)
    got = theirs(x, encoder_hidden_states=text.tokens, encoder_attention_mask=text.mask.long(), timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    _check_close(denoiser(x, t, cond=text), got, "PixArtTransformer2DModel")
    return theirs
