"""LoRA adapters in the layout diffusers reads (RUN/pytorch_lora_weights.safetensors): loaded into a
UNet2DConditionModel (load_lora_adapter, and StableDiffusionPipeline.load_lora_weights with tiny parts) the mapped
base computes what ddpmlab's adapted UNet computes (1e-5), alpha / r included; a fused q/k/v adapter splits into
to_q/k/v adapters that peft runs alike on UNet2DModel."""

import copy

import pytest
import torch
from _text_runs import clip_folder
from _util import perturb
from safetensors import safe_open

from ddpmlab.config import load_config
from ddpmlab.io.diffusers_bridge import to_diffusers_state_dict, unet2d_condition_config, unet2d_config
from ddpmlab.io.diffusers_lora import DIFFUSERS_LORA_FILE, diffusers_lora_state, save_diffusers_lora
from ddpmlab.models import build_model
from ddpmlab.models.lora import adapter_state, add_lora
from ddpmlab.models.text_condition import TextCondition

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_UNET = ["data.dataset=folder", "data.path=unused", "data.image_size=[16,16]", "data.channels=3",
             "unet.base_channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1",
             "unet.attention_resolutions=[8]", "unet.norm_groups=8", "unet.num_heads=2", "unet.dropout=0.0",
             "unet.context_dim=32", "unet.pooled_dim=12", "lora.rank=3", "lora.alpha=6"]


def _adapted(overrides):
    """(cfg, base, adapted): a perturbed UNet and a copy with random LoRA adapters on the default layers."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    base = perturb(build_model(cfg), 0, scale=0.2).eval()
    adapted = add_lora(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cfg, base, adapted.eval()


def _inputs(channels=3, size=16):
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, channels, size, size, generator=g), torch.tensor([5.0, 700.0])
    text = TextCondition(torch.randn(2, 7, 32, generator=g), torch.ones(2, 7, dtype=torch.bool),
                         torch.randn(2, 12, generator=g))
    return x, t, text


def _theirs(cfg, base):
    unet = diffusers.UNet2DConditionModel(**unet2d_condition_config(cfg)).eval()
    unet.load_state_dict(to_diffusers_state_dict(base.state_dict()), strict=True)
    return unet


def _call(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text.tokens, class_labels=text.pooled).sample


def test_unet2d_condition_model_loads_the_adapter_file_and_computes_what_ours_does(tmp_path):
    cfg, base, adapted = _adapted(TEXT_UNET)
    path = save_diffusers_lora(tmp_path, adapter_state(adapted), cfg, base.state_dict().keys())
    assert path == tmp_path / DIFFUSERS_LORA_FILE
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys
    x, t, text = _inputs()
    with torch.no_grad():
        ours, plain = adapted(x, t, cond=text), base(x, t, cond=text)
    unet = _theirs(cfg, base)
    torch.testing.assert_close(_call(unet, x, t, text), plain, atol=1e-5, rtol=1e-5)  # the bases agree
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="ddpmlab")
    assert (ours - plain).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(_call(unet, x, t, text), ours, atol=1e-5, rtol=1e-5)


def test_stable_diffusion_pipeline_load_lora_weights_reads_the_run_folder(tmp_path):
    cfg, base, adapted = _adapted(TEXT_UNET)
    save_diffusers_lora(tmp_path / "run", adapter_state(adapted), cfg, base.state_dict().keys())
    clip = clip_folder(tmp_path / "clip")
    transformers = pytest.importorskip("transformers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=3,
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=transformers.CLIPTextModel.from_pretrained(str(clip), local_files_only=True),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(clip), local_files_only=True),
        unet=_theirs(cfg, base), scheduler=diffusers.DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "run"))
    x, t, text = _inputs()
    with torch.no_grad():
        ours = adapted(x, t, cond=text)
    torch.testing.assert_close(_call(pipe.unet, x, t, text), ours, atol=1e-5, rtol=1e-5)


def test_a_fused_qkv_adapter_splits_into_to_q_k_v_adapters():
    """UNet2DModel (the plain attention blocks, q/k/v fused in ddpmlab): peft's adapters on to_q/k/v with the mapped
    tensors compute what the fused adapter does (diffusers' UNet2DModel has no LoRA loader, peft has)."""
    over = ["data.dataset=folder", "data.path=unused", "data.image_size=[8,8]", "data.channels=1",
            "unet.base_channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1",
            "unet.attention_resolutions=[4]", "unet.norm_groups=8", "lora.rank=2", "lora.alpha=5"]
    cfg, base, adapted = _adapted(over)
    mapped = diffusers_lora_state(adapter_state(adapted), 5 / 2, base.state_dict().keys())
    assert any(".to_q.lora_B" in k for k in mapped) and not any("qkv" in k for k in mapped)
    unet = diffusers.UNet2DModel(**unet2d_config(cfg)).eval()
    unet.load_state_dict(to_diffusers_state_dict(base.state_dict()), strict=True)
    modules = sorted({k[len("unet."):-len(".lora_A.weight")] for k in mapped if k.endswith("lora_A.weight")})
    unet = peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=modules), unet)
    peft.set_peft_model_state_dict(unet, {k[len("unet."):]: v for k, v in mapped.items()})
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        ours = adapted(x, t)
        assert (ours - base(x, t)).abs().max() > 1e-2
        torch.testing.assert_close(unet(x, t).sample, ours, atol=1e-5, rtol=1e-5)


def test_runs_whose_unet_does_not_map_write_no_diffusers_file(tmp_path):
    cfg, base, adapted = _adapted([o for o in TEXT_UNET if not o.startswith("unet.context_dim")
                                   and not o.startswith("unet.pooled_dim")])
    assert save_diffusers_lora(tmp_path, adapter_state(adapted), cfg, base.state_dict().keys()) is None
    assert not (tmp_path / DIFFUSERS_LORA_FILE).exists()
