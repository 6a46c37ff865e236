"""model/head.py: the chunked head loss equals cross-entropy over the whole logits, with ignored targets."""

import torch
import torch.nn.functional as F

from nanoseek.model import head
from nanoseek.model.head import Head


def test_chunked_loss_equals_whole_logits(monkeypatch):
    monkeypatch.setattr(head, "CHUNK", 7)  # 30 rows: chunks of 7, 7, 7, 7, 2
    lm = Head(16, 50, bias=False)
    h = torch.randn(2, 15, 16, requires_grad=True)
    y = torch.randint(0, 50, (2, 15))
    y[0, 3] = y[1, 9] = -100
    (got, again) = lm.losses([(h, y), (h[:, 1:], y[:, 1:])])
    want = F.cross_entropy((h @ lm.weight.T).flatten(0, 1), y.flatten())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, F.cross_entropy((h[:, 1:] @ lm.weight.T).flatten(0, 1), y[:, 1:].flatten()))
    gh, gw = torch.autograd.grad(got, [h, lm.weight])
    wh, ww = torch.autograd.grad(want, [h, lm.weight])
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)


def test_no_target_gives_zero():
    lm = Head(4, 6, bias=False)
    (loss,) = lm.losses([(torch.randn(3, 4), torch.full((3,), -100))])
    assert loss.item() == 0.0
