import pytest
import torch
import torch.nn.functional as F

from nanoseek.model.linear import Linear


@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 64), (2, 8, 64), (65, 64)])
@pytest.mark.parametrize("threads", [1, 4])
def test_decoding_path_equals_f_linear(shape, threads, monkeypatch):
    """W x^T for few rows, and one row as a bmm over row blocks, give F.linear's result in its shape."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the row blocks, whatever this machine has
    lin = Linear(64, 100, bias=True)
    x = torch.randn(shape)
    with torch.no_grad():
        y = lin(x)
    assert y.shape == (*shape[:-1], 100)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_autograd_uses_f_linear():
    lin = Linear(16, 8, bias=False)
    x = torch.randn(2, 16, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, 16))
