"""The UNet with text cross-attention (Stable Diffusion's transformer blocks): diffusers' UNet2DConditionModel
computes the same function on mapped weights, padding tokens change nothing, prompts in a batch are independent."""

from collections import namedtuple

import pytest
import torch
from _util import perturb

from ddpmlab.config import load_config
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.diffusers_bridge import (
    from_diffusers_state_dict,
    to_diffusers_state_dict,
    unet2d_condition_config,
    unet2d_config,
)
from ddpmlab.models import UNet, build_model
from ddpmlab.models.conditioned import bind_condition
from ddpmlab.models.text_condition import TextCondition, cat_text
from ddpmlab.models.transformer import SpatialTransformer, sincos_2d
from ddpmlab.training.distributed import micro_batches

# base 16 channels, 2 levels, attention (transformer blocks) at the 8x8 level and in the middle, 32-wide tokens
TINY = ["data.dataset=folder", "data.path=unused", "data.image_size=[16,16]", "data.channels=3",
        "unet.base_channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1",
        "unet.attention_resolutions=[8]", "unet.norm_groups=8", "unet.num_heads=2", "unet.dropout=0.0",
        "unet.context_dim=32"]
TOKENS = 7

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(overrides=(), seed=0):
    cfg = load_config(None, TINY + list(overrides))
    torch.manual_seed(seed)
    return cfg, perturb(build_model(cfg), seed, scale=0.2).eval()


def _text(batch, seed=1, length=TOKENS, pooled_dim=None, mask=True):
    """Random token embeddings; row i has its last i tokens (at most length - 1) masked out as padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, 32, generator=g)
    real = torch.tensor([[j < length - min(i, length - 1) for j in range(length)] for i in range(batch)])
    pooled = None if pooled_dim is None else torch.randn(batch, pooled_dim, generator=g)
    return TextCondition(tokens, real if mask else None, pooled)


def _inputs(batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.rand(batch, generator=g) * 999


def _call_diffusers(unet, x, t, text, y=None):
    labels = text.pooled if text.pooled is not None else y
    return unet(x, t, encoder_hidden_states=text.tokens, encoder_attention_mask=text.mask, class_labels=labels).sample


@pytest.mark.parametrize("overrides", [
    [],
    ["model.num_classes=3", "unet.transformer_depth=2"],
    ["unet.pooled_dim=12", "unet.attention_resolutions=[16,8]", "unet.channel_mults=[1,1]"],
], ids=["one-layer", "classes-two-layers", "pooled-two-levels"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_unet2d_condition_model_on_mapped_weights_equals_ours_to_1e5(overrides, masked):
    diffusers = pytest.importorskip("diffusers")
    cfg, ours = _model(overrides)
    theirs = diffusers.UNet2DConditionModel(**unet2d_condition_config(cfg)).eval()
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    back = from_diffusers_state_dict(theirs.state_dict())  # and back: the same weights under our names
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    x, t = _inputs(3)
    text = _text(3, pooled_dim=cfg.unet.pooled_dim, mask=masked)
    y = torch.tensor([0, 2, 3]) if cfg.model.num_classes else None
    with torch.no_grad():
        expected = _call_diffusers(theirs, x, t, text, y)
        assert expected.abs().max() > 0.1  # weights perturbed: a real function, not zeros
        torch.testing.assert_close(ours(x, t, y, cond=text), expected, atol=1e-5, rtol=1e-5)


def test_stable_diffusion_1_layout_with_conv_projections_loads_and_computes_the_same():
    """SD 1.x checkpoints keep proj_in/proj_out as 1x1 convs (use_linear_projection=False)."""
    diffusers = pytest.importorskip("diffusers")
    cfg, ours = _model()
    conf = dict(unet2d_condition_config(cfg), use_linear_projection=False)
    torch.manual_seed(3)
    theirs = perturb(diffusers.UNet2DConditionModel(**conf), 3, scale=0.2).eval()
    assert theirs.state_dict()["mid_block.attentions.0.proj_in.weight"].dim() == 4
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    x, t = _inputs(2)
    text = _text(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cond=text), _call_diffusers(theirs, x, t, text), atol=1e-5, rtol=1e-5)


def test_masked_out_tokens_do_not_change_the_output():
    """Property: whatever the padding tokens hold, and however many there are, the output is the same."""
    _, model = _model(["unet.pooled_dim=12"])
    x, t = _inputs(4)
    text = _text(4, pooled_dim=12)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        ref = model(x, t, cond=text)
        for _ in range(3):
            noise = torch.randn(text.tokens.shape, generator=g) * 10
            changed = torch.where(text.mask[..., None], text.tokens, noise)
            torch.testing.assert_close(model(x, t, cond=TextCondition(changed, text.mask, text.pooled)), ref,
                                       atol=1e-6, rtol=1e-6)
        for i in range(4):  # row i alone, its padding cut off: the same row of the output
            real = int(text.mask[i].sum())
            alone = TextCondition(text.tokens[i:i + 1, :real], None, text.pooled[i:i + 1])
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], cond=alone), ref[i:i + 1], atol=1e-5, rtol=1e-5)


def test_a_row_with_every_token_masked_attends_to_nothing():
    """A row of padding only: the cross-attention adds 0 (finite, independent of the tokens), gradients finite."""
    block = perturb(SpatialTransformer(16, 2, 32, groups=8), 4)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    tokens = torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [False] * 5])
    out = block(x, tokens, mask)
    out2 = block(x, tokens * 3, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], out2[1]) and not torch.allclose(out[0], out2[0])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_a_batch_of_prompts_equals_each_prompt_alone():
    """Guidance runs conditional and unconditional rows as one batch of 2B: rows of different lengths and
    masks, concatenated by cat_text, give what each gives alone; a bound condition repeats its rows."""
    _, model = _model()
    x, t = _inputs(2)
    cond, uncond = _text(2, seed=5, length=TOKENS), _text(2, seed=6, length=3, mask=False)
    both = cat_text([cond, uncond])
    assert both.tokens.shape == (4, TOKENS, 32) and both.mask[2:, 3:].any().item() is False
    with torch.no_grad():
        batched = model(torch.cat([x, x]), torch.cat([t, t]), cond=both)
        torch.testing.assert_close(batched[:2], model(x, t, cond=cond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[2:], model(x, t, cond=uncond), atol=1e-5, rtol=1e-5)
        bound = bind_condition(model, cond)  # 2 rows bound, a batch of 4 sees rows 0, 1, 0, 1
        torch.testing.assert_close(bound(torch.cat([x, x]), torch.cat([t, t])), torch.cat([batched[:2]] * 2),
                                   atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients_through_transformer_blocks():
    """Recomputing the transformer blocks in the backward pass changes neither the loss nor any gradient,
    the token embeddings' included (a text encoder trained with the denoiser learns through them)."""
    cfg, model = _model(["unet.transformer_depth=2", "unet.pooled_dim=12"])
    x, t = _inputs(2)
    text = _text(2, pooled_dim=12)
    grads = []
    for checkpointing in (False, True):
        model.train()
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        tokens = text.tokens.clone().requires_grad_(True)
        loss = model(x, t, cond=TextCondition(tokens, text.mask, text.pooled)).square().mean()
        loss.backward()
        grads.append([loss.detach(), tokens.grad] + [p.grad.clone() for p in model.parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0][1:3])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_text_condition_splits_selects_and_concatenates_like_a_batch():
    text = _text(5, pooled_dim=3)
    parts = text.chunk(2)
    assert [len(p) for p in parts] == [len(c) for c in torch.arange(5).chunk(2)]
    whole = cat_text(parts)
    for name in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(whole, name), getattr(text, name))
    x = torch.zeros(5, 1)
    (x0, c0), (x1, c1) = micro_batches(2, x, text)
    assert len(x0) == len(c0) == 3 and torch.equal(c1.tokens, text.tokens[3:])
    one = text[1]
    assert len(one) == 1 and torch.equal(one.expand(4).tokens, text.tokens[1:2].expand(4, -1, -1))
    half = text.to(dtype=torch.float16)
    assert half.tokens.dtype == torch.float16 and half.mask.dtype == torch.bool
    assert TextCondition(text.tokens, text.mask.long()).mask.dtype == torch.bool  # a tokenizer's 0/1 mask


def test_wrong_conditions_are_refused_in_one_line():
    _, model = _model(["unet.pooled_dim=12"])
    x, t = _inputs(2)
    with pytest.raises(ValueError, match="cond=TextCondition"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\(2, L, 32\)"):
        model(x, t, cond=TextCondition(torch.zeros(2, 3, 16), pooled=torch.zeros(2, 12)))
    with pytest.raises(ValueError, match="pooled text embedding of width 12"):
        model(x, t, cond=_text(2))
    plain = UNet(3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, norm_groups=8, image_size=16)
    with pytest.raises(ValueError, match="takes no condition"):
        plain(x, t, cond=_text(2))
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        TextCondition(torch.zeros(2, 7, 32), torch.ones(2, 6))


@pytest.mark.parametrize("overrides, message", [
    (["unet.context_dim=null", "unet.pooled_dim=8"], "unet.context_dim is null"),
    (["unet.context_dim=0"], "'unet.context_dim' must be a positive integer"),
    (["unet.transformer_depth=0"], "'unet.transformer_depth' must be > 0"),
    (["model.kind=dit", "dit.preset=DiT-S/2"], "model.kind is 'dit'"),
    (["model.condition=low_res", "data.low_res=[4,4]"], "cannot be combined"),
    (["unet.context_dim=null", "unet.positions=true"], "unet.positions=true embeds positions"),
])
def test_bad_cross_attention_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY + overrides)


def test_each_unet_layout_refuses_the_other_diffusers_class():
    cfg = load_config(None, TINY)
    with pytest.raises(DDPMError, match="UNet2DConditionModel"):
        unet2d_config(cfg)
    with pytest.raises(DDPMError, match="UNet2DModel"):
        unet2d_condition_config(load_config(None, TINY + ["unet.context_dim=null"]))
    with pytest.raises(DDPMError, match="one class embedding"):
        unet2d_condition_config(load_config(None, TINY + ["unet.pooled_dim=8", "model.num_classes=3"]))
    with pytest.raises(DDPMError, match="unet.positions=true adds a position embedding"):
        unet2d_condition_config(load_config(None, TINY + ["unet.positions=true"]))


def test_positions_add_the_2d_sincos_embedding_to_the_tokens_and_no_weight():
    """unet.positions: each position's sin-cos embedding is added after proj_in; through a transformer without
    blocks the output moves by exactly proj_out of it, and the UNet's weights are the same tensors by name."""
    torch.manual_seed(0)
    plain = SpatialTransformer(16, 2, 32, depth=0, groups=4)
    placed = SpatialTransformer(16, 2, 32, depth=0, groups=4, positions=True)
    placed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 4, 6)
    shift = (sincos_2d(16, 4, 6) @ plain.proj_out.weight.t()).t().reshape(16, 4, 6)  # (C, H, W)
    assert torch.allclose(placed(x, None) - plain(x, None), shift.expand(2, -1, -1, -1), atol=1e-5)
    assert sincos_2d(16, 4, 6)[7].tolist() == sincos_2d(16, 1, 7)[1].tolist()[:8] + sincos_2d(16, 2, 1)[1].tolist()[8:]
    _, a = _model()
    _, b = _model(["unet.positions=true"])
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), _text(2)
    assert not torch.allclose(bind_condition(a, cond)(x, t), bind_condition(b, cond)(x, t), atol=1e-3)


def test_a_text_encoders_output_is_taken_as_a_text_condition():
    """Any (tokens, mask, pooled) record, as a text encoder returns, conditions the UNet as a TextCondition."""
    Encoding = namedtuple("Encoding", "tokens mask pooled")
    _, model = _model()
    x, t = _inputs(2)
    text = _text(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond=Encoding(text.tokens, text.mask, None)), model(x, t, cond=text))
