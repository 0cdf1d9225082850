"""Files in and out: run checkpoints (safetensors, atomic), weights without pickles, images, diffusers.

* :mod:`.checkpoint` - the run directory, atomic checkpoints, finding the newest loadable one;
* :mod:`.weights` - state dicts from safetensors or ``torch.load(weights_only=True)``;
* :mod:`.images` - sample grids as PNG, pictures and masks read for editing;
* :mod:`.diffusers_bridge` - export to and import from diffusers' UNet2DModel + scheduler folders;
* :mod:`.diffusers_dit` - a DiT exported as DiTTransformer2DModel + scheduler;
* :mod:`.diffusers_schedule` - the diffusion section as a diffusers scheduler config and back;
* :mod:`.latent_export` - a latent run with its autoencoder as one diffusers folder.
"""
