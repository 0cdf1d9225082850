"""The UNet's speed-ups compute the same function: the sub-pixel form of upsample + conv."""

import pytest
import torch
import torch.nn.functional as F

from ddpmlab.models.unet import Upsample, subpixel_kernels


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 16, 20), (1, 2, 5, 7)])
def test_subpixel_upsample_equals_nearest_upsample_then_conv_with_gradients(shape, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(Upsample, "SUBPIXEL_MIN_PIXELS", 1)  # take the sub-pixel path at every size
    up = Upsample(shape[1]).double()
    torch.nn.init.normal_(up.conv.bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=torch.float64)
    fast = up(x)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-12)
    grads_fast = torch.autograd.grad((fast * g).sum(), [x, up.conv.weight, up.conv.bias])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, up.conv.weight, up.conv.bias])
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_subpixel_kernels_sum_the_taps_each_parity_sees():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k = subpixel_kernels(w)
    # parity (0, 0): source rows (i-1 | i) take kernel rows (0 | 1+2), same for columns
    assert k[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # parity (1, 1): rows (i | i+1) take (0+1 | 2), columns likewise
    assert k[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    assert k.sum().item() == 4 * w.sum().item()  # every tap used once per parity


def test_matmul_attention_equals_scaled_dot_product_attention_with_gradients():
    from ddpmlab.models.unet import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 20, 8, dtype=torch.float64)
    ours, ref = attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad((ours * g).sum(), [q, k, v]), torch.autograd.grad((ref * g).sum(), [q, k, v])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_matmul_attention_under_bf16_autocast_stays_close_to_fp32():
    from ddpmlab.models.unet import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 64, 32) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(q, k, v)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), F.scaled_dot_product_attention(q, k, v), atol=0.05, rtol=0.05)


def test_cpu_dropout_keeps_with_probability_1_minus_p_and_rescales():
    from ddpmlab.models.unet import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    y = drop(torch.ones(400_001))  # not a multiple of 4: the last 64-bit draw is cut
    kept = (y != 0).float().mean().item()
    p_used = 6554 / 65536  # 0.1 rounded to a multiple of 2^-16
    assert abs(kept - (1 - p_used)) < 4 * (p_used * (1 - p_used) / 400_001) ** 0.5  # binomial: 4 sigma
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p_used)))
    assert abs(1 / (1 - p_used) - 1 / 0.9) < 1e-5
    assert torch.equal(drop.eval()(y), y)  # identity in eval mode
    x = torch.randn(1000, requires_grad=True)
    out = Dropout(0.5).train()(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() * 2.0)  # gradient flows through kept units only
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_cpu_dropout_masks_are_independent_and_follow_the_seed():
    from ddpmlab.models.unet import cpu_dropout_mask

    torch.manual_seed(1)
    a = cpu_dropout_mask((4, 50_000), 0.5, torch.float32)
    torch.manual_seed(1)
    assert torch.equal(a, cpu_dropout_mask((4, 50_000), 0.5, torch.float32))  # seeded by torch's generator
    keep = (a != 0).float()
    # neighbours (four share a 64-bit draw) and rows are uncorrelated: correlation within 4 / sqrt(n)
    for u, v in [(keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:])]:
        corr = torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()
        assert abs(corr) < 4 / u.numel() ** 0.5
    assert abs(keep.mean().item() - 0.5) < 4 * 0.5 / keep.numel() ** 0.5
