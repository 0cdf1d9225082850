"""The UNet's CPU fast paths (ddpmlab.models.fast_ops) compute the same function as their plain forms."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from ddpmlab.models import fast_ops
from ddpmlab.models.fast_ops import (
    DROPOUT_LEVELS,
    FastDropout,
    attention,
    cpu_dropout_mask,
    fast_dropout,
    matmul_attention,
    plain_attention,
    plain_dropout,
    plain_upsample_conv,
    subpixel_kernels,
    subpixel_upsample_conv,
    upsample_conv,
    uses_subpixel,
)
from ddpmlab.models.unet import Upsample

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _boom(*args, **kwargs):
    raise AssertionError("the fast path was taken")


# --- upsampling: nearest x2 + 3x3 conv as four 2x2 convs ------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 16, 20), (1, 2, 5, 7)])
def test_subpixel_upsample_equals_nearest_upsample_then_conv_with_gradients(shape):
    """float64: outputs within 1e-12, gradients (input, weight, bias) within 1e-10."""
    torch.manual_seed(0)
    up = Upsample(shape[1]).double()
    torch.nn.init.normal_(up.conv.bias)
    w, b = up.conv.weight, up.conv.bias
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=torch.float64)
    fast = subpixel_upsample_conv(x, w, b)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(plain_upsample_conv(x, w, b), ref, atol=0, rtol=0)
    grads_fast = torch.autograd.grad((fast * g).sum(), [x, w, b])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, w, b])
    for a, c in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10)


def test_upsample_module_in_float32_equals_the_plain_form_to_1e5():
    torch.manual_seed(0)
    up = Upsample(8)
    torch.nn.init.normal_(up.conv.bias)
    x = torch.randn(2, 8, 16, 16)
    assert uses_subpixel(x)
    with torch.no_grad():
        torch.testing.assert_close(up(x), plain_upsample_conv(x, up.conv.weight, up.conv.bias), atol=1e-5, rtol=1e-5)


def test_subpixel_kernels_sum_the_taps_each_parity_sees():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k = subpixel_kernels(w)
    # parity (0, 0): source rows (i-1 | i) take kernel rows (0 | 1+2), same for columns
    assert k[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # parity (1, 1): rows (i | i+1) take (0+1 | 2), columns likewise
    assert k[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    assert k.sum().item() == 4 * w.sum().item()  # every tap used once per parity


def test_subpixel_form_only_for_cpu_maps_of_at_least_16x16(monkeypatch):
    assert uses_subpixel(torch.empty(1, 2, 16, 16)) and uses_subpixel(torch.empty(1, 2, 8, 32))
    assert not uses_subpixel(torch.empty(1, 2, 8, 8))
    meta = torch.empty(1, 2, 64, 64, device="meta")  # any non-CPU device
    assert not uses_subpixel(meta)
    monkeypatch.setattr(fast_ops, "subpixel_upsample_conv", _boom)
    w, b = torch.empty(3, 2, 3, 3, device="meta"), torch.empty(3, device="meta")
    assert upsample_conv(meta, w, b).shape == (1, 3, 128, 128)
    x, w, b = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3), torch.randn(3)  # small CPU map: plain form
    torch.testing.assert_close(upsample_conv(x, w, b), plain_upsample_conv(x, w, b), atol=0, rtol=0)


@cuda
def test_upsample_on_cuda_is_the_plain_form():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 32, 32), torch.randn(8, 8, 3, 3), torch.randn(8)
    xc, wc, bc = x.cuda(), w.cuda(), b.cuda()
    assert not uses_subpixel(xc)
    torch.testing.assert_close(upsample_conv(xc, wc, bc), plain_upsample_conv(xc, wc, bc), atol=0, rtol=0)
    torch.testing.assert_close(upsample_conv(xc, wc, bc).cpu(), subpixel_upsample_conv(x, w, b), atol=1e-3, rtol=1e-3)


# --- attention: two matrix products instead of SDPA on a CPU --------------------------------------

def test_matmul_attention_equals_scaled_dot_product_attention_with_gradients():
    """float64: outputs and gradients within 1e-12."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 20, 8, dtype=torch.float64)
    ours, ref = attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(matmul_attention(q, k, v), ours, atol=0, rtol=0)  # the CPU path for N <= 1024
    for a, b in zip(torch.autograd.grad((ours * g).sum(), [q, k, v]), torch.autograd.grad((ref * g).sum(), [q, k, v])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_matmul_attention_under_bf16_autocast_stays_close_to_fp32():
    """bf16 autocast against fp32 SDPA: within 0.05."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 64, 32) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(q, k, v)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), F.scaled_dot_product_attention(q, k, v), atol=0.05, rtol=0.05)


def test_attention_takes_sdpa_beyond_1024_tokens_and_off_the_cpu(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 1025, 4) for _ in range(3))
    monkeypatch.setattr(fast_ops, "matmul_attention", _boom)
    torch.testing.assert_close(attention(q, k, v), plain_attention(q, k, v), atol=0, rtol=0)
    meta = torch.empty(1, 1, 16, 4, device="meta")
    assert attention(meta, meta, meta).shape == (1, 1, 16, 4)


# --- dropout: masks cut from 64-bit random integers -----------------------------------------------

def test_cpu_dropout_keeps_with_probability_1_minus_p_and_rescales():
    torch.manual_seed(0)
    drop = FastDropout(0.1).train()
    y = drop(torch.ones(400_001))  # not a multiple of 4: the last 64-bit draw is cut
    kept = (y != 0).float().mean().item()
    p_used = 6554 / 65536  # 0.1 rounded to a multiple of 2^-16
    assert abs(kept - (1 - p_used)) < 4 * (p_used * (1 - p_used) / 400_001) ** 0.5  # binomial: 4 sigma
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p_used)))
    assert abs(1 / (1 - p_used) - 1 / 0.9) < 1e-5
    assert torch.equal(drop.eval()(y), y)  # identity in eval mode
    x = torch.randn(1000, requires_grad=True)
    out = FastDropout(0.5).train()(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() * 2.0)  # gradient flows through kept units only
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("p", [0.1, 1 / 3, 0.5, 0.9])
def test_fast_dropout_has_the_expectation_and_kept_fraction_of_plain_dropout(p):
    """E[out] = x exactly (kept probability times scale is 1); kept fraction within 4 sigma of 1 - p."""
    torch.manual_seed(0)
    n = 200_000
    dropped = round(p * DROPOUT_LEVELS)
    mask = fast_dropout(torch.ones(n), p)
    scale = mask.max().item()
    assert Fraction(DROPOUT_LEVELS - dropped, DROPOUT_LEVELS) * Fraction(scale) == pytest.approx(1, abs=2**-23)
    assert set(mask.unique().tolist()) == {0.0, scale}
    sigma = (p * (1 - p) / n) ** 0.5
    for out in (mask, plain_dropout(torch.ones(n), p)):
        assert abs((out != 0).float().mean().item() - (1 - p)) < 4 * sigma
        assert abs(out.double().mean().item() - 1) < 4 * sigma / (1 - p)  # E[out] = x = 1


def test_fast_dropout_gradient_is_the_mask():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    torch.manual_seed(0)
    mask = cpu_dropout_mask(x.shape, 0.1, x.dtype)
    torch.manual_seed(0)
    out = FastDropout(0.1).train()(x)
    assert torch.equal(out, x * mask)
    (grad,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(grad, mask)


def test_fast_dropout_is_torch_dropout_in_eval_at_p0_and_off_the_cpu(monkeypatch):
    x = torch.randn(64)
    assert torch.equal(FastDropout(0.3).eval()(x), x) and torch.equal(FastDropout(0.0).train()(x), x)
    monkeypatch.setattr(fast_ops, "cpu_dropout_mask", _boom)
    meta = torch.empty(8, 8, device="meta")
    assert FastDropout(0.3).train()(meta).shape == (8, 8)
    assert isinstance(FastDropout(0.1), torch.nn.Dropout) and FastDropout(0.1).state_dict() == {}


@cuda
def test_fast_dropout_on_cuda_is_torch_dropout():
    x = torch.ones(100_000, device="cuda")
    torch.manual_seed(0)
    ours = FastDropout(0.1).train()(x)
    torch.manual_seed(0)
    assert torch.equal(ours, F.dropout(x, 0.1, True))


def test_cpu_dropout_masks_are_independent_and_follow_the_seed():
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
