"""Gradient memory reused across steps (model/workspace.py): the expert products and the head cross-entropy give
the same values and gradients as the plain ops, adopt the workspace's memory as .grad step after step, and never
overwrite a gradient still held (accumulation over micro-batches, zero_grad without set_to_none)."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.model.cross_entropy import linear_cross_entropy
from nanoseek.model.moe import GroupedLinear
from nanoseek.model.workspace import Workspace


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("gather", [False, True])
def test_grouped_linear_equals_grouped_mm_with_an_empty_expert(gather):
    """Y_j = X_j W_j^T and its gradients, with X the rows x[token] gathered inside (as the experts call it:
    tokens repeated, one never chosen) or x itself."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 4, 2])
    x = torch.randn(6 if gather else 9, 12, requires_grad=True)
    token = torch.tensor([0, 2, 4, 1, 2, 3, 0, 4, 3]) if gather else None  # row 5 is never chosen
    w = torch.nn.Parameter(torch.randn(4, 8, 12))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(9, 8)
    y = GroupedLinear.apply(x, w, counts, Workspace(), token)
    y.backward(g)
    y2 = F.grouped_mm(x2 if token is None else x2[token], w2.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    y2.backward(g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().sum() == 0  # the expert without rows
    if gather:
        assert x.grad[5].abs().sum() == 0 and x.grad[0].abs().sum() > 0


def test_weight_gradients_reuse_memory_and_accumulate():
    """Steps with zero_grad(set_to_none=True): the same memory each step. Micro-batches: the sum, not the last."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    params = {"head": model.lm_head.weight, "experts": model.layers[-1].mlp.experts.gate_up_proj,
              "embedding": model.embed_tokens.weight}

    def grads(batch):
        model.zero_grad(set_to_none=True)
        model(batch, labels=batch).loss.backward()
        return {k: p.grad.clone() for k, p in params.items()}, {k: ptr(p.grad) for k, p in params.items()}

    first, where = grads(ids)
    again, where_again = grads(ids)
    assert where_again == where  # the workspace's memory, adopted as .grad
    for k in params:
        torch.testing.assert_close(again[k], first[k])
    other, _ = grads(ids.flip(0).roll(3, dims=1))
    # two micro-batches accumulated: the sum of both gradients
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    model(ids.flip(0).roll(3, dims=1), labels=ids.flip(0).roll(3, dims=1)).loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, first[k] + other[k])
    # zero_grad without set_to_none keeps .grad: the next backward adds to zeros, it does not write into it
    model.zero_grad(set_to_none=False)
    model(ids, labels=ids).loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, first[k])


def test_embedding_gradient_equals_nn_embedding():
    from nanoseek.model.embedding import Embedding

    torch.manual_seed(0)
    ours, ref = Embedding(20, 8), torch.nn.Embedding(20, 8)
    ref.weight.data.copy_(ours.weight.data)
    ids = torch.tensor([[1, 5, 5, 19], [0, 1, 7, 5]])
    g = torch.randn(2, 4, 8)
    for _ in range(2):
        ours.weight.grad = ref.weight.grad = None
        y = ours(ids)
        y.backward(g)
        ref(ids).backward(g)
        torch.testing.assert_close(y, ref(ids))
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_head_cross_entropy_with_a_workspace_equals_the_plain_one():
    torch.manual_seed(0)
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(50, 16))
    y = torch.randint(0, 50, (30,))
    want = F.cross_entropy(h @ w.T, y)
    gh, gw = torch.autograd.grad(want, [h, w])
    ws = Workspace()
    for _ in range(2):
        w.grad, h.grad = None, None
        got = linear_cross_entropy(h, w, y, workspace=ws)
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(h.grad, gh)
        torch.testing.assert_close(w.grad, gw)
        assert ptr(w.grad) == ptr(ws._grads[0])


def test_main_and_mtp_losses_share_one_head_gradient():
    """With MTP the head weight gets one summed gradient (equal to the logits path's) in reused memory."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    head = model.lm_head.weight

    def fused():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids.roll(-1, dims=1))
        (out.loss + 0.3 * out.mtp_losses[0]).backward()
        return out, head.grad.clone(), ptr(head.grad)

    out, g1, p1 = fused()
    _, g2, p2 = fused()
    assert p1 == p2
    torch.testing.assert_close(g1, g2)
    model.zero_grad(set_to_none=True)
    ref = model(ids)
    labels = ids.roll(-1, dims=1)
    main = F.cross_entropy(ref.logits.flatten(0, 1), labels.flatten())
    mtp = F.cross_entropy(ref.mtp_logits[0].flatten(0, 1), labels[:, 1:].flatten())
    (main + 0.3 * mtp).backward()
    torch.testing.assert_close(out.loss, main)
    torch.testing.assert_close(out.mtp_losses[0], mtp)
    torch.testing.assert_close(g1, head.grad)


def test_a_copied_model_does_not_share_or_copy_the_memory():
    import copy

    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    twin = copy.deepcopy(model)
    assert twin._workspaces[0]._grads == [] and model._workspaces[0]._grads
