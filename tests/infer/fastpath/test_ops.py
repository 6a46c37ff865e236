"""The decoding plan's ops (infer/fastpath/ops.py), each equal to the reference's."""

import pytest
import torch

from nanoseek.config import ModelConfig, yarn_example
from nanoseek.infer.fastpath.ops import experts_few, rms_norm, rope_matrices, rotate
from nanoseek.model import norm
from nanoseek.model.moe import Experts
from nanoseek.model.rope import apply_rope, rope_table


def test_rms_norm_as_layer_norm():
    x, w = torch.randn(3, 64) * 5, torch.randn(64)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6))
    torch.testing.assert_close(rms_norm(x * 1e-4, w, 1e-2), norm.rms_norm(x * 1e-4, w, 1e-2))  # eps counts
    x16 = torch.randn(16, 64)
    torch.testing.assert_close(rms_norm(x16, w, 1e-6), norm.rms_norm(x16, w, 1e-6))  # many rows: the composite


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matrices_rotate_like_apply_rope(interleave):
    """x @ R[i] = RoPE of x at row i's position (the decoding plan's one-product RoPE), YaRN factors included."""
    cfg = ModelConfig.preset("tiny", rope_scaling=yarn_example(original=16))
    cos, sin = rope_table(cfg, 64)
    pos = torch.tensor([0, 5, 63])
    x = torch.randn(3, 4, cfg.qk_rope_head_dim)  # (rows, heads, d_r)
    expected = apply_rope(x[None], cos[pos][None], sin[pos][None], interleave)[0]
    rot = rope_matrices(cos[pos], sin[pos], interleave)
    torch.testing.assert_close(x @ rot, expected)
    torch.testing.assert_close(rotate(x, rot), expected)
    torch.testing.assert_close(rotate(x.double(), rot), expected.double())  # fp32 rotation, x's dtype back



@pytest.mark.parametrize("tokens", [1, 5, 24])
def test_experts_few_equals_experts(tokens):
    """The routed experts of a few rows, one W x^T per expert with rows, give Experts.forward's output."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    experts = Experts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(tokens, cfg.hidden_size)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok] for _ in range(tokens)])
    weights = torch.rand(tokens, cfg.num_experts_per_tok)
    with torch.no_grad():
        want = experts(x, idx, weights)[0]
        got = experts_few(list(experts.gate_up_proj.unbind(0)), list(experts.down_proj.unbind(0)), x, idx, weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
