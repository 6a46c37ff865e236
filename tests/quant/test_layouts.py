"""The int8 / int4 layouts: the formulas, exact round trips, and torch's packed kernels against F.linear of the
dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.quant.layouts import (INT4_GROUPS, dequantize_int4, dequantize_int8, int4_mm, int8_mm, pack_int4,
                                    quantize_int4, quantize_int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_is_per_channel_symmetric_and_round_trips_exactly(dtype):
    w = torch.randn(40, 72) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different scales
    q, s = quantize_int8(w, dtype)
    assert q.dtype == torch.int8 and s.shape == (40,) and s.dtype == dtype
    assert int(q.abs().max(dim=1).values.min()) == 127  # each row's largest |w| maps to 127
    dq = dequantize_int8(q, s)
    assert torch.equal(dq, q.float() * s.float()[:, None])  # W = q s, exactly
    assert (dq - w).abs().le(s.float()[:, None] * 0.5 + 1e-6 * w.abs()).all()  # round to nearest
    q2, s2 = quantize_int8(dq, dtype)  # the dequantized weight is a fixed point
    assert torch.equal(q2, q) and torch.equal(s2, s)


@pytest.mark.parametrize("group", INT4_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_is_groupwise_min_max_and_round_trips_exactly(group, dtype):
    w = torch.randn(24, 512) + torch.linspace(-3, 3, 512)  # each group with its own offset
    q, s, z = quantize_int4(w, group, dtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (24, 512 // group)
    g = w.view(24, -1, group)
    torch.testing.assert_close(s.float(), ((g.amax(-1) - g.amin(-1)) / 15).to(dtype).float())
    dq = dequantize_int4(q, s, z)
    err = (dq - w).view(24, -1, group).abs().amax(-1)
    assert (err <= s.float() * 0.5 + 0.02 * s.float() + (4 * s.float() if dtype == torch.bfloat16 else 0)).all()
    expected = (q.float().view(24, -1, group) - 8) * s.float()[..., None] + z.float()[..., None]
    assert torch.equal(dq, expected.view(24, 512))  # W = (q - 8) s + z, exactly
    if dtype == torch.float32:  # the dequantized weight is a fixed point (in bf16 rounded scales move the range)
        q2, s2, z2 = quantize_int4(dq, group, dtype)
        assert torch.equal(q2, q)
        torch.testing.assert_close(dequantize_int4(q2, s2, z2), dq, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_out", [16, 40, 100])  # 40, 100: rows padded to the kernel's 16 and cut
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int4_kernel_equals_linear_of_the_dequantized_weight(n_out, rows):
    w, x = torch.randn(n_out, 256), torch.randn(rows, 256)
    q, s, z = quantize_int4(w, 64, torch.float32)
    y = int4_mm(x, *pack_int4(q, s, z), n_out)
    assert y.shape == (rows, n_out)
    torch.testing.assert_close(y, F.linear(x, dequantize_int4(q, s, z)), atol=1e-4, rtol=1e-4)
    qb, sb, zb = quantize_int4(w, 64, torch.bfloat16)
    yb = int4_mm(x.bfloat16(), *pack_int4(qb, sb, zb), n_out)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), F.linear(x, dequantize_int4(qb, sb, zb)), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_kernel_equals_linear_of_the_dequantized_weight(rows):
    w, x = torch.randn(48, 96), torch.randn(rows, 96)
    q, s = quantize_int8(w, torch.float32)
    torch.testing.assert_close(int8_mm(x, q, s), F.linear(x, dequantize_int8(q, s)), atol=1e-4, rtol=1e-4)


def test_int4_group_errors_name_the_tensor_and_the_choices():
    with pytest.raises(ValueError, match=r"does not divide its input dimension 96"):
        quantize_int4(torch.randn(16, 96), 64, torch.float32)
    with pytest.raises(ValueError, match=r"must be one of \(32, 64, 128, 256\)"):
        quantize_int4(torch.randn(16, 96), 48, torch.float32)
