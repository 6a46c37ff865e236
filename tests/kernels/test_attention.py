"""kernels/attention.py: the blocked causal kernel equals SDPA in values and gradients, is chosen where it runs,
and a model with BlockedMLA trains and prefills as the plain one."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer, kernels
from nanoseek.kernels import attention
from nanoseek.kernels.attention import BlockCausal, BlockedMLA, causal_attention
from tests.conftest import tiny_model

BLOCKED = kernels.Settings(gemm="blas", attention="blocked", head="plain", experts="plain")


def qkv(b, h, s, d_qk=12, d_v=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype, requires_grad=True) for d in (d_qk, d_qk, d_v)]


def reference(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # the math kernel (d_v != d_qk)


@pytest.mark.parametrize("s", [1, 3, 4, 5, 9, 16])
def test_gradcheck_over_several_blocks(monkeypatch, s):
    monkeypatch.setattr(attention, "BLOCK", 4)  # s up to 16: 1-4 blocks, a partial last one
    q, k, v = (t.flatten(0, 1) for t in qkv(1, 2, s))
    assert torch.autograd.gradcheck(lambda q, k, v: BlockCausal.apply(q, k, v, 0.3), (q, k, v))


@pytest.mark.parametrize("s", [64, 100, 128, 200])
def test_blocks_equal_sdpa(s):
    """Values and gradients against SDPA at the real block size: one block, a partial one, several."""
    q, k, v = qkv(2, 3, s)
    g = torch.randn(2, 3, s, 8, dtype=torch.float64)
    out = BlockCausal.apply(*(t.flatten(0, 1) for t in (q, k, v)), 0.25).view(2, 3, s, 8)
    ref = reference(q, k, v, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def kernel(o: torch.Tensor) -> str:
    """The autograd node that produced o, under its view."""
    node = o.grad_fn
    while node.name().startswith(("View", "Slice", "Unsafe")):
        node = node.next_functions[0][0]
    return node.name()


@pytest.mark.parametrize("s, grad, dtype, blocked", [
    (128, True, torch.float32, True), (1024, True, torch.float32, True), (300, True, torch.float64, True),
    (64, True, torch.float32, False), (1100, True, torch.float32, False),  # outside the measured range
    (300, True, torch.bfloat16, False),  # low precision: SDPA
])
def test_causal_attention_picks_a_kernel_and_matches(s, grad, dtype, blocked):
    q, k, v = (t.detach().to(dtype).requires_grad_(grad) for t in qkv(1, 2, s, d_qk=24, d_v=16, seed=1))
    out = causal_attention(q, k, v, 0.2)
    assert ("BlockCausal" in kernel(out)) == blocked
    ref = reference(q, k, v, 0.2)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **tol)


def test_without_grad_runs_sdpa():
    q, k, v = (t.detach().float() for t in qkv(1, 2, 256, d_qk=24, d_v=16))
    with torch.no_grad():
        out = causal_attention(q, k, v, 0.2)
    assert out.shape == (1, 2, 256, 16)
    torch.testing.assert_close(out, reference(q, k, v, 0.2), rtol=1e-5, atol=1e-6)


def step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_equals_plain_sdpa():
    """A forward + backward of a tiny model at 130 tokens (three blocks): same loss and gradients as plain SDPA."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    blocked = copy.deepcopy(model)
    kernels.apply(blocked, BLOCKED)
    assert type(blocked.layers[0].self_attn) is BlockedMLA
    ids = torch.randint(0, model.config.vocab_size, (2, 131))
    fused_loss, fused = step(blocked, ids)
    plain_loss, plain = step(model, ids)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert fused.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_prefill_equals_plain_sdpa():
    """Without autograd: SDPA with V padded for the CPU flash kernel, against the plain model's SDPA."""
    model = tiny_model()
    blocked = copy.deepcopy(model)
    kernels.apply(blocked, BLOCKED)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(blocked(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
