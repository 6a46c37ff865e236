import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig
from nanoseek.model import moe as moe_mod
from nanoseek.model.moe import MoE


def make_moe(**overrides) -> MoE:
    cfg = ModelConfig.preset("nano", **overrides)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    if cfg.uses_router_bias:
        m.gate.e_score_correction_bias.normal_(0, 0.1)
    return m


def per_token_reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written as a loop over tokens and their chosen experts."""
    flat = x.reshape(-1, x.shape[-1])
    weights, idx, _ = m.gate(flat)
    out = torch.zeros_like(flat)
    E = m.experts
    I = E.down_proj.shape[2]
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], idx[t]):
            g, u = E.gate_up_proj[e, :I] @ flat[t], E.gate_up_proj[e, I:] @ flat[t]
            out[t] += w * (E.down_proj[e] @ (F.silu(g) * u))
    out = out.view_as(x)
    return out + m.shared_experts(x)


def test_grouped_experts_equal_per_token_loop():
    m = make_moe()
    x = torch.randn(2, 9, 256)
    y, stats = m(x)
    torch.testing.assert_close(y, per_token_reference(m, x), atol=1e-5, rtol=1e-4)
    assert int(stats.tokens_per_expert.sum()) == 2 * 9 * 4


def test_loop_fallback_equals_grouped_mm(monkeypatch):
    m = make_moe()
    x = torch.randn(3, 5, 256, requires_grad=True)
    y1, _ = m(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, m.experts.gate_up_proj])
    monkeypatch.setattr(moe_mod, "grouped_mm_ok", lambda t: False)
    y2, _ = m(x)
    g2 = torch.autograd.grad(y2.square().sum(), [x, m.experts.gate_up_proj])
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # W x^T vs x W^T: summation order


def test_bias_steers_selection_not_weights():
    m = make_moe()
    gate = m.gate
    x = torch.randn(64, 256)
    gate.e_score_correction_bias.zero_()
    w0, idx0, s = gate(x)
    gate.e_score_correction_bias[5] = 10.0  # expert 5 wins every token's selection
    w1, idx1, s1 = gate(x)
    assert torch.equal(s, s1)
    assert (idx1 == 5).any(dim=1).all() and not torch.equal(idx0, idx1)
    # weights are the unbiased sigmoid scores of the chosen experts, renormalized and scaled
    want = s.gather(1, idx1)
    torch.testing.assert_close(w1, want / want.sum(1, keepdim=True) * 2.5)


def test_group_limited_routing_keeps_topk_groups():
    m = make_moe()
    gate = m.gate
    gate.e_score_correction_bias.uniform_(-3, -2)  # all biased scores negative: masking must be -inf, not 0
    x = torch.randn(200, 256)
    _, idx, s = gate(x)
    G, per = gate.n_group, gate.n_experts // gate.n_group
    groups = idx // per
    assert all(len(set(row.tolist())) <= gate.topk_group for row in groups)
    biased = (s + gate.e_score_correction_bias).view(-1, G, per)
    best = biased.topk(2, dim=-1).values.sum(-1).topk(gate.topk_group, dim=-1).indices
    for row, keep in zip(groups, best):
        assert set(row.tolist()) <= set(keep.tolist())


def test_softmax_greedy_gate_v2_style():
    m = make_moe(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)
    assert not hasattr(m.gate, "e_score_correction_bias")
    x = torch.randn(32, 256)
    w, idx, s = m.gate(x)
    ref = F.linear(x, m.gate.weight).softmax(-1).topk(4, dim=-1)
    torch.testing.assert_close(w, ref.values)
    assert torch.equal(idx.sort(1).values, ref.indices.sort(1).values)


def test_group_max_gate_v2():
    m = make_moe(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False)
    x = torch.randn(50, 256)
    _, idx, s = m.gate(x)
    best = s.view(-1, 4, 4).amax(-1).topk(2, dim=-1).indices
    for row, keep in zip(idx // 4, best):
        assert set(row.tolist()) <= set(keep.tolist())


@torch.no_grad()
def test_balance_loss_formula():
    m = make_moe()
    b, T, E, K = 3, 10, 16, 4
    x = torch.randn(b, T, 256)
    _, stats = m(x)
    _, idx, s = m.gate(x.reshape(-1, 256))
    idx, s = idx.view(b, T, K), s.view(b, T, E)
    want = 0.0
    for j in range(b):
        f = torch.tensor([E / (K * T) * sum(int(i in idx[j, t].tolist()) for t in range(T)) for i in range(E)])
        P = (s[j] / s[j].sum(-1, keepdim=True)).mean(0)
        want += float((f * P).sum()) / b
    assert float(stats.balance_loss) == pytest.approx(want, rel=1e-5)


def test_bias_stays_fp32_and_gets_no_gradient():
    m = make_moe().to(torch.bfloat16)
    assert m.gate.e_score_correction_bias.dtype == torch.float32
    assert "e_score_correction_bias" not in dict(m.named_parameters())
    y, _ = m(torch.randn(1, 4, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16



@pytest.mark.parametrize("tokens", [1, 16])
def test_decoding_expert_loop_equals_reference(tokens):
    """Without autograd, few rows per expert take the per-expert W x^T loop: same result as the reference."""
    m = make_moe()
    x = torch.randn(tokens, 1, 256)
    with torch.no_grad():
        y, stats = m(x, balance_loss=False)
    torch.testing.assert_close(y, per_token_reference(m, x).view_as(y), atol=1e-5, rtol=1e-4)
    assert int(stats.tokens_per_expert.sum()) == tokens * 4
