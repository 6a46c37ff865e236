"""kernels/experts.py: GroupedLinear equals the grouped GEMM (values and gradients, an expert without rows, rows
gathered inside or not), on BLAS and through oneDNN."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.kernels import gemm
from nanoseek.kernels.experts import GroupedLinear

LIBRARIES = [False] + [True] * (gemm.onednn_product() is not None)


@pytest.mark.parametrize("onednn", LIBRARIES)
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_linear_equals_grouped_mm_with_an_empty_expert(gather, onednn):
    """Y_j = X_j W_j^T and its gradients, with X the rows x[token] gathered inside (as the experts call it:
    tokens repeated, one never chosen) or x itself; 70 rows for expert 2, so that oneDNN takes 64 of them."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 70, 2])
    T = int(counts.sum())
    x = torch.randn(T - 3 if gather else T, 12, requires_grad=True)
    token = torch.randint(0, T - 4, (T,)) if gather else None  # row T - 4 is never chosen
    w = torch.nn.Parameter(torch.randn(4, 8, 12))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(T, 8)
    y = GroupedLinear.apply(x, w, counts, onednn, token)
    y.backward(g)
    y2 = F.grouped_mm(x2 if token is None else x2[token], w2.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    y2.backward(g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().sum() == 0  # the expert without rows
    if gather:
        assert x.grad[T - 4].abs().sum() == 0
