"""The text DiT (PixArt-alpha's blocks): diffusers' PixArtTransformer2DModel computes the same function on mapped
weights, padding tokens change nothing, prompts in a batch are independent, checkpointing changes no gradient."""

import pytest
import torch
from _util import perturb

from ddpmlab.config import load_config
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.io.diffusers_dit import dit_transformer_config
from ddpmlab.io.diffusers_pixart import from_pixart_state_dict, pixart_config, to_pixart_state_dict
from ddpmlab.models import build_model
from ddpmlab.models.transformer import sincos_2d
from ddpmlab.models.dit_text import TextDiT
from ddpmlab.models.text_condition import TextCondition, cat_text

TINY = ["data.dataset=folder", "data.path=unused", "data.image_size=[16,16]", "data.channels=4",
        "model.kind=dit", "dit.depth=2", "dit.hidden=64", "dit.heads=4", "dit.patch_size=4", "dit.context_dim=32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(overrides=(), seed=0):
    cfg = load_config(None, TINY + list(overrides))
    model = perturb(build_model(cfg), seed, scale=0.2).eval()
    with torch.no_grad():  # the position embedding is fixed (diffusers recomputes it)
        model.pos_embed.copy_(sincos_2d(model.hidden, *model.grid)[None])
    return cfg, model


def _text(batch, seed=1, length=7, pooled_dim=None, mask=True):
    """Random token embeddings; row i has its last i tokens (at most length - 1) masked out as padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, 32, generator=g)
    real = torch.tensor([[j < length - min(i, length - 1) for j in range(length)] for i in range(batch)])
    pooled = None if pooled_dim is None else torch.randn(batch, pooled_dim, generator=g)
    return TextCondition(tokens, real if mask else None, pooled)


def _assert_same(a, b):
    """Equal up to float32 rounding, which a different batch or attention kernel changes: 1e-5 of the output's size."""
    torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def _inputs(batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.rand(batch, generator=g) * 999


def test_a_text_dit_config_builds_pixart_blocks_that_start_at_output_zero():
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    assert isinstance(model, TextDiT) and model.context_dim == 32
    x, t = _inputs(2)
    assert torch.equal(model(x, t, cond=_text(2)), torch.zeros(2, 4, 16, 16))  # zero final layer (PixArt's init)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_pixart_transformer_on_mapped_weights_equals_ours_to_1e5(masked):
    diffusers = pytest.importorskip("diffusers")
    cfg, ours = _model()
    theirs = diffusers.PixArtTransformer2DModel(**pixart_config(cfg, ours)).eval()
    theirs.load_state_dict(to_pixart_state_dict(ours.state_dict()), strict=True)
    back = from_pixart_state_dict(theirs.state_dict(), ours.grid)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    x, t = _inputs(3)
    text = _text(3, mask=masked)
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=text.tokens, encoder_attention_mask=text.mask, timestep=t).sample
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(ours(x, t, cond=text), expected, atol=1e-5, rtol=1e-5)


def test_masked_out_tokens_do_not_change_the_output():
    _, model = _model(["dit.pooled_dim=12", "model.num_classes=3"])
    x, t = _inputs(3)
    y = torch.tensor([0, 1, 3])
    text = _text(3, pooled_dim=12)
    with torch.no_grad():
        ref = model(x, t, y, cond=text)
        noise = torch.randn(text.tokens.shape, generator=torch.Generator().manual_seed(7)) * 10
        changed = TextCondition(torch.where(text.mask[..., None], text.tokens, noise), text.mask, text.pooled)
        torch.testing.assert_close(model(x, t, y, cond=changed), ref, atol=1e-6, rtol=1e-6)
        for i in range(3):
            real = int(text.mask[i].sum())
            alone = TextCondition(text.tokens[i:i + 1, :real], None, text.pooled[i:i + 1])
            _assert_same(model(x[i:i + 1], t[i:i + 1], y[i:i + 1], cond=alone), ref[i:i + 1])
        # the pooled embedding and the class label both enter the output
        assert not torch.allclose(model(x, t, y, cond=TextCondition(text.tokens, text.mask, text.pooled * 0)), ref)
        assert not torch.allclose(model(x, t, None, cond=text), ref)


def test_a_batch_of_prompts_equals_each_prompt_alone():
    _, model = _model()
    x, t = _inputs(2)
    cond, uncond = _text(2, seed=5), _text(2, seed=6, length=3, mask=False)
    with torch.no_grad():
        batched = model(torch.cat([x, x]), torch.cat([t, t]), cond=cat_text([cond, uncond]))
        _assert_same(batched[:2], model(x, t, cond=cond))
        _assert_same(batched[2:], model(x, t, cond=uncond))


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = _model()
    x, t = _inputs(2)
    text = _text(2)
    grads = []
    for checkpointing in (False, True):
        model.train()
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        tokens = text.tokens.clone().requires_grad_(True)
        loss = model(x, t, cond=TextCondition(tokens, text.mask)).square().mean()
        loss.backward()
        grads.append([loss.detach(), tokens.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert grads[0][1].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_text_dit_refuses_a_missing_condition_and_what_diffusers_cannot_hold():
    cfg, model = _model(["model.num_classes=3"])
    x, t = _inputs(2)
    with pytest.raises(ValueError, match="cond=TextCondition"):
        model(x, t)
    with pytest.raises(DDPMError, match="model.num_classes does not map"):
        pixart_config(cfg, model)
    cfg, model = _model(["dit.pooled_dim=8"])
    with pytest.raises(DDPMError, match="dit.pooled_dim does not map"):
        pixart_config(cfg, model)
    with pytest.raises(DDPMError, match="maps to PixArtTransformer2DModel"):
        dit_transformer_config(cfg, model)


@pytest.mark.parametrize("overrides, message", [
    (["dit.context_dim=null", "dit.pooled_dim=8"], "dit.context_dim is null"),
    (["dit.context_dim=-1"], "'dit.context_dim' must be a positive integer"),
    (["unet.context_dim=32"], "a DiT reads text with dit.context_dim"),
    (["model.kind=unet", "dit.depth=null", "dit.hidden=null", "dit.heads=null", "dit.patch_size=null"],
     "dit.context_dim sizes a DiT"),
])
def test_bad_text_dit_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY + overrides)
