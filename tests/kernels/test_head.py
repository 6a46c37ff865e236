"""kernels/head.py: the fused head cross-entropy equals the plain one (loss and gradients, uneven chunks, ignored
targets), sums the main and MTP gradients of the shared head into one, and runs its backward once."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer, kernels
from nanoseek.kernels import head
from nanoseek.kernels.head import FusedHead, linear_cross_entropies


def test_equals_logits_cross_entropy(monkeypatch):
    monkeypatch.setattr(head, "_chunk_rows", lambda vocab: 7)  # 30 rows: chunks of 7, 7, 7, 7, 2
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (30,))
    y[[3, 9, 29]] = -100
    want = F.cross_entropy(h @ w.T, y, ignore_index=-100)
    gh, gw = torch.autograd.grad(0.5 * want, [h, w])
    (got,) = linear_cross_entropies([(h, y)], w)
    (0.5 * got).backward()  # a scale other than 1, as with gradient accumulation
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_backward_runs_once():
    h = torch.randn(4, 8, requires_grad=True)
    (loss,) = linear_cross_entropies([(h, torch.randint(0, 10, (4,)))], torch.randn(10, 8))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_main_and_mtp_losses_share_one_head_gradient():
    """With MTP the fused head's weight gets one summed gradient, equal to the plain head's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    fused = copy.deepcopy(model)
    kernels.apply(fused, kernels.Settings(gemm="blas", attention="sdpa", head="fused", experts="plain"))
    assert type(fused.lm_head) is FusedHead
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    labels = ids.roll(-1, dims=1)
    outs = []
    for m in (fused, model):
        out = m(ids, labels=labels)
        (out.loss + 0.3 * out.mtp_losses[0]).backward()
        outs.append((out.loss, out.mtp_losses[0], m.lm_head.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
