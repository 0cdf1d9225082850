"""The bridge to HF diffusers: export a run as a ``DDPMPipeline`` folder, load a ``UNet2DModel``.

A DiT run exports as a ``DiTTransformer2DModel`` + scheduler folder (:mod:`ddpmlab.io.diffusers_dit`);
the scheduler config is translated both ways in :mod:`ddpmlab.io.diffusers_schedule`.  A flow run's
scheduler is ``FlowMatchEulerDiscreteScheduler``, and its folder has a README.md with the sampling loop
(:mod:`ddpmlab.io.diffusers_flow`).

ddpmlab's :class:`~ddpmlab.models.UNet` has the block structure of diffusers' ``UNet2DModel``
built from ``DownBlock2D`` / ``AttnDownBlock2D`` blocks, so the weights map one to one by
renaming (and splitting the fused q/k/v projection)::

    ours                                diffusers
    time_embed.0 / .2                   time_embedding.linear_1 / linear_2
    class_embed                         class_embedding
    down.{i}.res.{j}                    down_blocks.{i}.resnets.{j}
    down.{i}.attn.{j}.qkv               down_blocks.{i}.attentions.{j}.to_q / to_k / to_v
    down.{i}.attn.{j}.proj_out          down_blocks.{i}.attentions.{j}.to_out.0
    down.{i}.downsample                 down_blocks.{i}.downsamplers.0
    mid.res1 / attn / res2              mid_block.resnets.0 / attentions.0 / resnets.1
    up.{k}.upsample                     up_blocks.{k}.upsamplers.0
    norm_out                            conv_norm_out

A UNet with text cross-attention (``unet.context_dim``) has the layout of ``UNet2DConditionModel``
(``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` / ``UNetMidBlock2DCrossAttn``,
:func:`unet2d_condition_config`): its transformer blocks sit where the attention blocks sit and map
by :mod:`ddpmlab.io.diffusers_transformer`; ``pooled_embed.0 / .2`` is ``class_embedding.linear_1 /
linear_2`` (``class_embed_type="projection"``, the pooled embedding passed as ``class_labels``).

diffusers is an optional dependency (``pip install 'ddpmlab[diffusers]'``), imported only when a
function needs it (:func:`~ddpmlab.io.diffusers_schedule.require_diffusers`).  Nothing is ever downloaded:
folders are read locally, and their weights from safetensors only (a folder with only a pickled ``.bin`` is
refused before diffusers would unpickle it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Tuple

import torch

from ddpmlab.config import Config, save_config, validate
from ddpmlab.data import data_shape
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import load_model
from ddpmlab.io.diffusers_dit import export_dit
from ddpmlab.io.diffusers_flow import write_flow_card
from ddpmlab.io.diffusers_schedule import diffusion_from_scheduler, require_diffusers, run_scheduler
from ddpmlab.io.diffusers_transformer import split_transformer_weights
from ddpmlab.models import UNet
from ddpmlab.models.autoencoder import require_safetensors

_WHOLE_NAMES = [  # (ours, diffusers), applied first in either direction
    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
    ("pooled_embed.0.", "class_embedding.linear_1."), ("pooled_embed.2.", "class_embedding.linear_2."),
    ("class_embed.", "class_embedding."), ("norm_out.", "conv_norm_out."),
    ("mid.res1.", "mid_block.resnets.0."), ("mid.res2.", "mid_block.resnets.1."),
    ("mid.attn.", "mid_block.attentions.0."),
]
_PARTS = [  # (ours, diffusers), then these in this order (diffusers -> ours: in reverse)
    (".res.", ".resnets."), (".attn.", ".attentions."), ("down.", "down_blocks."), ("up.", "up_blocks."),
    (".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
    (".temb_proj.", ".time_emb_proj."), (".shortcut.", ".conv_shortcut."), (".proj_out.", ".to_out.0."),
]


def _to_theirs(key: str) -> str:
    for ours, theirs in _WHOLE_NAMES + _PARTS:
        key = key.replace(ours, theirs)
    return key


def _to_ours(key: str) -> str:
    for ours, theirs in _WHOLE_NAMES + _PARTS[::-1]:  # whole names first, then parts in reverse
        key = key.replace(theirs, ours)
    return key


# ---------------------------------------------------------------- weights

def to_diffusers_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a ddpmlab UNet state dict to UNet2DModel's keys (UNet2DConditionModel's with text cross-attention);
    qkv (3C, C) splits into to_q/k/v."""
    out, state = split_transformer_weights(state, _to_theirs, to_diffusers=True)
    for key, value in state.items():
        k = _to_theirs(key)
        if "attentions" in k:
            k = k.replace(".norm.", ".group_norm.")
        if ".qkv." in k:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[k.replace("qkv", name)] = part.contiguous()
        else:
            out[k] = value
    return out


def from_diffusers_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers_state_dict`: to_q/k/v are stacked back into qkv."""
    out, state = split_transformer_weights(state, _to_ours, to_diffusers=False)
    for key, value in state.items():
        k = key
        if "attentions" in k:
            k = k.replace(".group_norm.", ".norm.")
        k = _to_ours(k)
        if re.search(r"\.to_[kv]\.", k):
            continue  # stacked together with to_q below
        if ".to_q." in k:
            parts = [state[key.replace(".to_q.", f".to_{n}.")] for n in "qkv"]
            out[k.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
        else:
            out[k] = value
    return out


# ---------------------------------------------------------------- export

def _shared_config(cfg: Config) -> Tuple[dict, list]:
    """The constructor arguments UNet2DModel and UNet2DConditionModel share for ``cfg``'s UNet, and which levels
    attend; a DDPMError naming the option that does not map."""
    m, c = cfg.unet, cfg
    if cfg.model.kind != "unet":
        raise DDPMError(f"model.kind={cfg.model.kind!r} does not map to diffusers' UNet2DModel; only model.kind=unet exports")
    if c.diffusion.prediction == "edm":
        raise DDPMError("diffusion.prediction=edm does not map: diffusers' schedulers have no EDM preconditioning "
                        "around a UNet2DModel (train with prediction eps, x0 or v to export)")
    if m.channel_mults[0] != 1:
        raise DDPMError(f"unet.channel_mults={list(m.channel_mults)} does not map: UNet2DModel's first level has "
                        "the width of conv_in (unet.base_channels), so channel_mults must start with 1")

    channels, height, width = data_shape(c)
    attn = [height // 2**i in m.attention_resolutions for i in range(len(m.channel_mults))]
    variance = c.diffusion.variance
    return dict(
        sample_size=height if height == width else [height, width], in_channels=channels,
        out_channels=channels * (2 if variance == "learned_range" else 1),
        block_out_channels=[m.base_channels * k for k in m.channel_mults], layers_per_block=m.num_res_blocks,
        norm_num_groups=m.norm_groups, norm_eps=1e-6, dropout=m.dropout,
        downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, time_embedding_type="positional",
        act_fn="silu", mid_block_scale_factor=1, center_input_sample=False,
        num_class_embeds=cfg.model.num_classes + 1 if cfg.model.num_classes else None,  # the extra row: "no label"
    ), attn


def unet2d_config(cfg: Config) -> dict:
    """UNet2DModel's constructor arguments for ``cfg``'s UNet, or a DDPMError naming the option that does not map."""
    m = cfg.unet
    if m.context_dim is not None:
        raise DDPMError(f"unet.context_dim={m.context_dim}: a UNet with text cross-attention maps to diffusers' "
                        "UNet2DConditionModel (unet2d_condition_config), not to UNet2DModel")
    conf, attn = _shared_config(cfg)
    widths = conf["block_out_channels"]
    head_dim = None  # diffusers: one head as wide as the channels
    if m.num_heads > 1:
        attn_widths = {w for w, a in zip(widths, attn) if a} | {widths[-1]}  # the middle block always attends
        if len(attn_widths) > 1:
            raise DDPMError(f"unet.num_heads={m.num_heads} with attention on {sorted(attn_widths)} channels does not "
                            "map: UNet2DModel fixes the head width, so every attention level must have the same "
                            "number of channels (or use unet.num_heads=1)")
        head_dim = attn_widths.pop() // m.num_heads
    return dict(conf, attention_head_dim=head_dim,
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)])


def unet2d_condition_config(cfg: Config) -> dict:
    """UNet2DConditionModel's constructor arguments for ``cfg``'s UNet with text cross-attention (unet.context_dim),
    or a DDPMError naming the option that does not map.

    Call it as ``unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask, class_labels=...)``: the
    class labels, or the pooled text embedding when unet.pooled_dim is set (``class_embed_type="projection"``).
    """
    m = cfg.unet
    if m.context_dim is None:
        raise DDPMError("unet.context_dim is null: the UNet has no text cross-attention and maps to diffusers' "
                        "UNet2DModel (unet2d_config), not to UNet2DConditionModel")
    if m.positions:
        raise DDPMError("unet.positions=true adds a position embedding to the transformer blocks, which diffusers' "
                        "UNet2DConditionModel has not: this run does not export to diffusers")
    if m.pooled_dim is not None and cfg.model.num_classes:
        raise DDPMError(f"model.num_classes={cfg.model.num_classes} with unet.pooled_dim={m.pooled_dim} does not map: "
                        "UNet2DConditionModel has one class embedding, for labels or for the pooled text embedding")
    conf, attn = _shared_config(cfg)
    conf.update(
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=m.context_dim,
        transformer_layers_per_block=m.transformer_depth, use_linear_projection=True,
        attention_head_dim=m.num_heads,  # UNet2DConditionModel reads attention_head_dim as the number of heads
    )
    if m.pooled_dim is not None:  # the add-embedding: Linear -> SiLU -> Linear of the pooled embedding
        conf.update(class_embed_type="projection", projection_class_embeddings_input_dim=m.pooled_dim)
    return conf


def new_output_folder(out) -> Path:
    """``out`` as a Path, refused when it exists and is not empty (an export never mixes into a folder)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DDPMError(f"output folder '{out}' exists and is not empty; choose a new folder")
    return out


def export_diffusers(run_dir, out, which: str = "ema", adapters=()) -> Path:
    """Write ``run_dir``'s weights (LoRA ``adapters``, ``ADAPTER[:SCALE]`` each, baked in) as a folder
    ``DDPMPipeline.from_pretrained(out)`` loads (safetensors).

    Checks that the exported UNet2DModel computes what ours does (float32, tolerance 1e-4).
    A DiT run (model.kind dit) is written as a transformer + scheduler folder: see :func:`export_dit`.
    A flow run's scheduler is FlowMatchEulerDiscreteScheduler (DDPMPipeline's loop is then Euler on the flow
    ODE), and ``out/README.md`` holds the loop with class labels and guidance (:mod:`ddpmlab.io.diffusers_flow`).
    """
    diffusers = require_diffusers()
    out = new_output_folder(out)
    cfg, model = load_model(run_dir, which, "cpu", adapters=adapters)
    if cfg.model.autoencoder:
        raise DDPMError(f"{run_dir} is a latent run: export it with its autoencoder "
                        "(ddpmlab.io.latent_export.export_latent_run, or `ddpm export`)")
    if cfg.model.kind == "dit":  # a transformer + scheduler folder (see export_dit)
        return export_dit(cfg, model, out)
    unet = unet2d_model(cfg, model, run_dir)
    diffusers.DDPMPipeline(unet=unet, scheduler=run_scheduler(cfg)).save_pretrained(str(out), safe_serialization=True)
    save_config(cfg, out / "ddpmlab_config.yaml")  # provenance; diffusers ignores it
    if cfg.diffusion.process == "flow":
        write_flow_card(cfg, out, "unet")
    return out


def unet2d_model(cfg: Config, model, run_dir):
    """diffusers' UNet2DModel holding ``model``'s weights, checked to compute what it does (float32, 1e-4)."""
    unet = require_diffusers().UNet2DModel(**unet2d_config(cfg))
    try:
        unet.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    except RuntimeError as e:  # a new architecture option this bridge does not know yet
        raise DDPMError(f"the model of {run_dir} does not map to UNet2DModel ({str(e).splitlines()[0]})") from None
    _check_same_outputs(model, unet.eval(), cfg)
    return unet


@torch.no_grad()
def _check_same_outputs(ours, theirs, cfg: Config, atol: float = 1e-4) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *data_shape(cfg), generator=g)
    t = torch.tensor([10.0, cfg.diffusion.num_timesteps - 0.5])  # a flow's network time t * T is fractional
    y = torch.tensor([0, cfg.model.num_classes]) if cfg.model.num_classes else None
    a, b = ours(x, t, y), theirs(x, t, class_labels=y).sample
    err = (a - b).abs().max().item()
    if not err <= atol * max(1.0, a.abs().max().item()):
        raise DDPMError(f"the exported UNet2DModel does not reproduce the model (max difference {err:.2e}); "
                        "its architecture has an option the diffusers bridge does not map")


# ---------------------------------------------------------------- import

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DDPMError(f"cannot read {path}: {e}") from None


def find_diffusers_folders(folder) -> Tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a pipeline folder (``unet/``, ``scheduler/``) or a flat one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DDPMError(f"diffusers folder '{folder}' does not exist; give a local folder saved with "
                        "save_pretrained (e.g. a downloaded google/ddpm-cifar10-32)")
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise DDPMError(f"'{folder}' has no unet/config.json or config.json; it is not a diffusers model folder")
    for cand in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise DDPMError(f"'{folder}' has no scheduler/scheduler_config.json or scheduler_config.json; "
                    "ddpmlab needs the noise schedule the model was trained with")


def unet_kwargs_from_unet2d(conf: dict) -> dict:
    """ddpmlab UNet arguments for a UNet2DModel config, or a DDPMError naming the key that does not map."""
    def need(key, ok, default, why):
        value = conf.get(key, default)
        if not ok(value):
            raise DDPMError(f"diffusers UNet2DModel with {key}={value!r} does not map to ddpmlab's UNet: {why}")
        return value

    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DDPMError(f"diffusers model class {conf['_class_name']} is not supported; only UNet2DModel maps")
    need("time_embedding_type", lambda v: v == "positional", "positional", "only sinusoidal time embeddings")
    need("act_fn", lambda v: v == "silu", "silu", "ddpmlab's UNet uses SiLU")
    need("center_input_sample", lambda v: not v, False, "inputs must already be in [-1, 1]")
    need("resnet_time_scale_shift", lambda v: v == "default", "default", "the time embedding must enter as a bias")
    need("mid_block_type", lambda v: v == "UNetMidBlock2D", "UNetMidBlock2D",
         "the middle block must be ResNet-attention-ResNet")
    need("add_attention", lambda v: v, True, "the middle block must attend")
    need("mid_block_scale_factor", lambda v: v == 1, 1, "residuals are not rescaled")
    need("downsample_type", lambda v: v == "conv", "conv", "downsampling is a strided conv")
    need("upsample_type", lambda v: v == "conv", "conv", "upsampling is nearest + conv")
    need("class_embed_type", lambda v: v is None, None, "class labels must be an nn.Embedding (num_class_embeds)")
    groups = need("norm_num_groups", lambda v: isinstance(v, int), 32, "norm groups must be given")
    need("attn_norm_num_groups", lambda v: v in (None, groups), None, "attention must use norm_num_groups")
    widths = list(conf.get("block_out_channels", (224, 448, 672, 896)))
    base = widths[0]
    need("block_out_channels", lambda v: all(w % base == 0 for w in widths), widths,
         "every level's width must be a multiple of the first")
    need("time_embedding_dim", lambda v: v in (None, 4 * base), None, "the time embedding is 4 x the first width")
    need("downsample_padding", lambda v: v in (0, 1), 1, "padding must be 0 (TF SAME) or 1")
    down = need("down_block_types", lambda v: set(v) <= {"DownBlock2D", "AttnDownBlock2D"}, None,
                "only DownBlock2D and AttnDownBlock2D blocks")
    up = need("up_block_types", lambda v: set(v) <= {"UpBlock2D", "AttnUpBlock2D"}, None,
              "only UpBlock2D and AttnUpBlock2D blocks")
    attn = [b == "AttnDownBlock2D" for b in down]
    need("up_block_types", lambda v: [b == "AttnUpBlock2D" for b in reversed(v)] == attn, up,
         "attention must sit at the same levels on the way down and up")
    size = need("sample_size", lambda v: v is not None, None, "the image size must be given")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    head_dim = conf.get("attention_head_dim", 8)
    ncls = conf.get("num_class_embeds")
    return dict(
        in_channels=conf.get("in_channels", 3), out_channels=conf.get("out_channels", 3), base_channels=base,
        channel_mults=tuple(wd // base for wd in widths), num_res_blocks=conf.get("layers_per_block", 2),
        attention_resolutions=tuple(h // 2**i for i, a in enumerate(attn) if a), dropout=conf.get("dropout", 0.0),
        num_heads=1, norm_groups=groups, num_classes=ncls - 1 if ncls else None, image_size=(h, w),
        norm_eps=conf.get("norm_eps", 1e-5), time_shift=conf.get("freq_shift", 0),
        time_flip=conf.get("flip_sin_to_cos", True), downsample_padding=conf.get("downsample_padding", 1),
        attention_head_dim=head_dim,
    )


def load_diffusers_model(folder, device="cpu"):
    """(config, UNet in eval mode) of a local diffusers UNet2DModel + scheduler folder.

    The config describes the model for ddpmlab's samplers (``data.dataset`` is ``folder``
    with the model's image size and channels); nothing is downloaded.
    """
    unet_dir, sched_file = find_diffusers_folders(folder)
    kwargs = unet_kwargs_from_unet2d(_read_json(unet_dir / "config.json"))
    diffusion = diffusion_from_scheduler(_read_json(sched_file))
    learned = diffusion.get("variance") == "learned_range"
    if kwargs["out_channels"] != kwargs["in_channels"] * (2 if learned else 1):
        raise DDPMError(f"diffusers UNet2DModel with out_channels={kwargs['out_channels']} and in_channels="
                        f"{kwargs['in_channels']} does not fit scheduler variance_type={diffusion['variance']}")
    if kwargs["in_channels"] not in (1, 3, 4):
        raise DDPMError(f"diffusers UNet2DModel with in_channels={kwargs['in_channels']}: ddpmlab samples images "
                        "with 1, 3 or 4 channels")
    try:
        model = UNet(**kwargs)
    except (ValueError, DDPMError) as e:
        raise DDPMError(f"diffusers model in '{folder}' does not map to ddpmlab's UNet: {e}") from None
    model.load_state_dict(from_diffusers_state_dict(_load_unet2d_weights(unet_dir)), strict=True)
    return _describe(kwargs, diffusion, folder), model.to(device).eval()


def _describe(kwargs: dict, diffusion: dict, folder) -> Config:
    """A validated ddpmlab Config describing an imported model (for the samplers and the CLI)."""
    cfg = Config()
    d, m = cfg.data, cfg.unet
    d.dataset, d.path, d.channels = "folder", str(folder), kwargs["in_channels"]
    d.image_size = list(kwargs["image_size"])
    m.base_channels, m.channel_mults = kwargs["base_channels"], list(kwargs["channel_mults"])
    m.num_res_blocks, m.attention_resolutions = kwargs["num_res_blocks"], list(kwargs["attention_resolutions"])
    m.norm_groups, m.dropout, cfg.model.num_classes = kwargs["norm_groups"], kwargs["dropout"], kwargs["num_classes"]
    for key, value in diffusion.items():
        setattr(cfg.diffusion, key, value)
    if diffusion.get("variance") == "learned_range":  # the loss is irrelevant for sampling; config checks want hybrid
        cfg.diffusion.loss_type = "hybrid"
    cfg.train.sample_steps = min(cfg.train.sample_steps, diffusion["num_timesteps"])
    validate(cfg, source=f"diffusers model {folder}")
    return cfg


def _load_unet2d_weights(unet_dir: Path) -> Dict[str, torch.Tensor]:
    """UNet2DModel's state dict read by diffusers itself (old key names renamed), from safetensors only."""
    diffusers = require_diffusers()
    require_safetensors(unet_dir)  # a .bin would be unpickled
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, use_safetensors=True)
    except Exception as e:  # diffusers raises many kinds of errors for a broken folder
        raise DDPMError(f"diffusers could not load the UNet in '{unet_dir}': {str(e).splitlines()[0]}") from None
    return {k: v.float() for k, v in unet.state_dict().items()}
