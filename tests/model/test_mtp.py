import torch
import torch.nn.functional as F

from nanoseek.model import mtp_loss
from tests.conftest import tiny_model


def test_mtp_shapes_for_each_depth():
    model = tiny_model(num_nextn_predict_layers=2)
    out = model(torch.randint(0, 512, (3, 20)))
    assert [tuple(t.shape) for t in out.mtp_logits] == [(3, 19, 512), (3, 18, 512)]
    assert len(out.router) == len(model.moe_layers()) == 2 + 2  # two main MoE layers, two MTP blocks


def test_mtp_loss_targets_are_k_plus_one_ahead():
    """Depth k at position i predicts token i + k + 1: labels (main targets t_{i+1}) shifted by k."""
    tokens = torch.randint(0, 512, (2, 17))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    logits = [torch.randn(2, 16 - k, 512) for k in (1, 2)]
    losses = mtp_loss(logits, labels)
    for k, (lg, loss) in enumerate(zip(logits, losses), start=1):
        want = F.cross_entropy(lg.flatten(0, 1), tokens[:, k + 1: k + 1 + lg.shape[1]].flatten())
        torch.testing.assert_close(loss, want)
        assert ids.shape[1] - k == lg.shape[1]


def test_mtp_sees_only_the_past_and_the_next_token():
    """Depth-1 logits at position i depend on tokens 0..i+1 (the main prefix plus the embedded t_{i+1})."""
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 24))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 512
    with torch.no_grad():
        a, b = model(ids).mtp_logits[0], model(changed).mtp_logits[0]
    diff = (a - b).abs().amax(-1)[0]
    assert diff[:9].max() < 1e-6 and diff[9:].min() > 1e-4


def test_mtp_embedding_goes_first_in_eh_proj():
    """cat([enorm(emb), hnorm(h)]): zeroing eh_proj's first H columns removes the token's influence."""
    model = tiny_model()
    H = model.config.hidden_size
    with torch.no_grad():
        model.mtp[0].eh_proj.weight[:, :H] = 0
        ids = torch.randint(0, 512, (1, 12))
        changed = ids.clone()
        changed[0, 11] = (ids[0, 11] + 1) % 512  # only seen by MTP through the embedding at position 10
        assert (model(ids).mtp_logits[0] - model(changed).mtp_logits[0]).abs().max() < 1e-6


def test_losses_from_labels_equal_losses_from_logits():
    """forward(labels=...) (chunked, no logits held) gives the same losses and gradients as the logits."""
    model = tiny_model(num_nextn_predict_layers=2).train()
    tokens = torch.randint(0, 512, (2, 33))
    ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[0, :5] = -100
    a = model(ids)
    la = F.cross_entropy(a.logits.flatten(0, 1), labels.flatten()) + sum(mtp_loss(a.mtp_logits, labels))
    ga = torch.autograd.grad(la, list(model.parameters()))
    b = model(ids, labels=labels)
    assert b.logits is None and b.mtp_logits == [] and len(b.mtp_losses) == 2
    lb = b.loss + sum(b.mtp_losses)
    gb = torch.autograd.grad(lb, list(model.parameters()))
    torch.testing.assert_close(la, lb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
