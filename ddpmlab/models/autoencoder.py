"""The first stage of latent diffusion (Rombach et al. 2022): a KL-regularised autoencoder and a PatchGAN.

The autoencoder is diffusers' ``AutoencoderKL`` (the VAE of Stable Diffusion), so a local Stable
Diffusion VAE folder and one trained by ``ddpm train-autoencoder`` are the same network:

    encoder E: x (B, C, H, W) -> q(z|x) = N(mu, diag sigma^2), z: (B, c, H/f, W/f), f = 2^(levels-1)
    decoder D: z -> x_hat

trained on ``rec(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I))`` (Rombach et al. 2022, Sec. 3 and
App. G), optionally plus an adversarial term from a patch discriminator (Esser et al. 2021, Eq. 4-7).
Diffusion then runs on ``z' = (mu - shift) * scale`` (the posterior mean, scaled to unit variance;
Stable Diffusion's scale is 0.18215) and :class:`LatentCodec` maps samples back to pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ddpmlab.errors import ConfigError, DDPMError


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:  # pragma: no cover - diffusers is a dependency of ddpmlab
        raise ConfigError("latent diffusion needs diffusers (pip install diffusers)") from None
    return AutoencoderKL


class KLAutoencoder(nn.Module):
    """diffusers' AutoencoderKL with the training forward pass of Rombach et al. 2022.

    ``vae``: the diffusers module (its state dict keys are ``vae.<diffusers key>``).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    @property
    def downsampling(self) -> int:
        """f: the encoder halves H and W at every level but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def posterior(self, x: torch.Tensor):
        """q(z|x): diffusers' DiagonalGaussianDistribution over (B, c, H/f, W/f)."""
        return self.vae.encode(x).latent_dist

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """D(z): (B, c, h, w) -> (B, C, h*f, w*f), unclamped."""
        return self.vae.decode(z).sample

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, KL per example): x_hat = D(z), z ~ q(z|x) (reparameterised), KL summed over latent dims."""
        q = self.posterior(x)
        z = q.mean + q.std * torch.randn(q.mean.shape, generator=generator, device=q.mean.device,
                                         dtype=q.mean.dtype)
        return self.decode(z), q.kl()


def build_autoencoder(in_channels: int, block_out_channels: Sequence[int], latent_channels: int,
                      layers_per_block: int, norm_groups: int) -> KLAutoencoder:
    """A new AutoencoderKL: ``len(block_out_channels)`` levels (f = 2^(levels-1)), ``latent_channels`` c."""
    bad = [c for c in block_out_channels if c % norm_groups]
    if bad:
        raise ConfigError(f"autoencoder.norm_groups ({norm_groups}) must divide every autoencoder.block_out_channels "
                          f"entry, got {list(block_out_channels)}")
    levels = len(block_out_channels)
    vae = _autoencoder_kl()(in_channels=in_channels, out_channels=in_channels,
                            down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels,
                            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                            latent_channels=latent_channels, norm_num_groups=norm_groups)
    return KLAutoencoder(vae)


SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def require_safetensors(folder) -> None:
    """Refuse a diffusers model folder without safetensors weights, before diffusers reads it: one holding
    only diffusion_pytorch_model.bin would be unpickled (which can run code; older diffusers and torch
    unpickle it in full), and ddpmlab never unpickles a file."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    found = f"only {pickled[0]}, a pickle," if pickled else "no diffusion_pytorch_model.safetensors"
    raise DDPMError(f"diffusers folder '{folder}' holds {found} and ddpmlab reads diffusers weights as "
                    "safetensors only (unpickling can run code); where you trust the weights, re-save them with "
                    "diffusers' save_pretrained(FOLDER, safe_serialization=True)")


def load_diffusers_vae(folder) -> KLAutoencoder:
    """A local diffusers AutoencoderKL folder (config.json + safetensors weights); nothing is downloaded."""
    require_safetensors(folder)
    vae = _autoencoder_kl().from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return KLAutoencoder(vae)


def diffusers_vae_config(folder) -> Optional[dict]:
    """The config.json of a diffusers AutoencoderKL folder, or None when ``folder`` is not one."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("_class_name") == "AutoencoderKL" else None


class LatentCodec:
    """Pixels <-> diffusion latents: ``encode(x) = (mu(x) - shift) * scale``, ``decode(z) = D(z / scale + shift)``.

    ``identity`` names the weights (a hash) and the scaling, for the latent cache's key.
    """

    def __init__(self, autoencoder: KLAutoencoder, scale: float, shift: float, identity: str, source: str):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale, self.shift = float(scale), float(shift)
        self.identity, self.source = identity, source

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def to(self, device) -> "LatentCodec":
        self.autoencoder.to(device)
        return self

    def latent_shape(self, image_shape: Sequence[int]) -> tuple:
        f = self.autoencoder.downsampling
        return (self.autoencoder.latent_channels, image_shape[1] // f, image_shape[2] // f)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> z': (B, c, H/f, W/f) float32 on x's device (the posterior mean)."""
        x = x.to(self.device, torch.float32)
        return ((self.autoencoder.posterior(x).mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z': (B, c, h, w) -> x: (B, C, h*f, w*f) in [-1, 1], float32 on z's device."""
        out = self.autoencoder.decode(z.to(self.device, torch.float32) / self.scale + self.shift)
        return out.clamp(-1.0, 1.0).float().to(z.device)


class PatchDiscriminator(nn.Module):
    """The PatchGAN of Isola et al. 2017 as used by Esser et al. 2021 (taming's NLayerDiscriminator).

    x: (B, C, H, W) -> logits (B, 1, H', W'), one per overlapping patch; ``num_layers`` stride-2 convolutions.
    """

    def __init__(self, in_channels: int, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for n in range(1, num_layers + 1):
            c_out = channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init: N(0, 0.02) convolutions, N(1, 0.02) norms
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (Esser et al. 2021): 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4) at the decoder's last layer L (Esser et al. 2021, Eq. 7)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
