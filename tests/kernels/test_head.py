"""The chunked head cross-entropy equals the plain one: loss and gradients, uneven chunks, ignored targets."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import cross_entropy
from nanoseek.model.cross_entropy import linear_cross_entropy


def test_equals_logits_cross_entropy(monkeypatch):
    monkeypatch.setattr(cross_entropy, "_chunk_rows", lambda vocab: 7)  # 30 rows: chunks of 7, 7, 7, 7, 2
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (30,))
    y[[3, 9, 29]] = -100
    want = F.cross_entropy(h @ w.T, y, ignore_index=-100)
    gh, gw = torch.autograd.grad(0.5 * want, [h, w])
    got = linear_cross_entropy(h, w, y)
    (0.5 * got).backward()  # a scale other than 1, as with gradient accumulation
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_backward_runs_once():
    h = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(10, 8), torch.randint(0, 10, (4,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
