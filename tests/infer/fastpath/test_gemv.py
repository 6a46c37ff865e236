"""GEMV helpers (infer/fastpath/gemv.py): W x^T for few rows, and one row as a bmm over per-thread row blocks,
equal F.linear's result."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.infer.fastpath.gemv import blocked, each_rows_t, matmul_wt, mul_wt, rows_t


@pytest.mark.parametrize("rows", [1, 3, 65])
@pytest.mark.parametrize("threads", [1, 4])
def test_matmul_wt_equals_f_linear(rows, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the row blocks, whatever this machine has
    w, x = torch.randn(100, 64), torch.randn(rows, 64)
    torch.testing.assert_close(matmul_wt(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [2, 4])
def test_one_row_through_row_blocks_and_shared_operands(threads, monkeypatch):
    """A pre-blocked weight, an `out` buffer and one operand per row of a batch (each_rows_t) give F.linear's."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w, x = torch.randn(96, 32), torch.randn(3, 32)
    xt = rows_t(x[:1])
    assert xt.shape == (threads, 32, 1)
    out = torch.empty(1, 96)
    mul_wt(xt, w, blocked(w, threads), out=out)
    torch.testing.assert_close(out, F.linear(x[:1], w), atol=1e-5, rtol=1e-5)
    for i, xt_i in enumerate(each_rows_t(x)):
        torch.testing.assert_close(mul_wt(xt_i, w), F.linear(x[i:i + 1], w), atol=1e-5, rtol=1e-5)
    assert blocked(w, 5) is None  # 96 rows do not split in 5: mul_wt falls back to one GEMV
    torch.testing.assert_close(mul_wt(rows_t(x[:1]), w, None), F.linear(x[:1], w), atol=1e-5, rtol=1e-5)
