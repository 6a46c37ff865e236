import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model import mtp_loss
from tests.conftest import tiny_model


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 32))
    changed = ids.clone()
    changed[:, 20] = (ids[:, 20] + 7) % 512
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # not bitwise: expert group sizes change with token 20's routing, and with them the GEMM blocking
    assert (a[:, :20] - b[:, :20]).abs().amax() < 1e-6
    assert (a[:, 20:] - b[:, 20:]).abs().amax(-1).min() > 1e-4


def test_gradients_reach_every_parameter_and_not_the_bias():
    model = tiny_model().train()
    ids = torch.randint(0, 512, (2, 24))
    out = model(ids[:, :-1])
    labels = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    loss = loss + 0.3 * sum(mtp_loss(out.mtp_logits, labels)) + 1e-4 * sum(r.balance_loss for r in out.router)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for moe in model.moe_layers():
        assert moe.gate.e_score_correction_bias.grad is None
        assert not moe.gate.e_score_correction_bias.requires_grad


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=512\); got \[0, 512\]"):
        model(torch.tensor([[0, 512]]))
    with pytest.raises(ValueError, match="got \\[-1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="sequence length 513 exceeds max_position_embeddings=512"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(batch, seq\\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=600 exceeds"):
        model.new_cache(1, 600)


def test_hf_state_dict_round_trip_and_errors():
    model = tiny_model()
    sd = model.hf_state_dict()
    assert "model.layers.3.eh_proj.weight" in sd and "model.layers.1.mlp.experts.7.down_proj.weight" in sd
    assert "model.layers.0.mlp.gate_proj.weight" in sd  # first layer dense
    other = Transformer(model.config)
    other.load_hf_state_dict(sd)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
        assert torch.equal(other(ids).mtp_logits[0], model(ids).mtp_logits[0])
    broken = dict(sd)
    del broken["model.layers.2.self_attn.o_proj.weight"]
    broken["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    broken["model.layers.9.foo"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        other.load_hf_state_dict(broken)
    msg = str(err.value)
    assert "missing keys (1): layers.2.self_attn.o_proj.weight" in msg
    assert "layers.0.mlp.up_proj.weight: checkpoint (3, 3) vs model (128, 64)" in msg
    assert "model.layers.9.foo" in msg


def test_bf16_model_runs_with_fp32_router_bias():
    model = tiny_model().to(torch.bfloat16)
    out = model(torch.randint(0, 512, (1, 16)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in model.moe_layers())


def test_deterministic_forward():
    ids = torch.randint(0, 512, (2, 16))
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_v2_style_model_runs():
    cfg = ModelConfig.preset("tiny", q_lora_rank=None, topk_method="greedy", scoring_func="softmax",
                             norm_topk_prob=False, routed_scaling_factor=1.0, model_type="deepseek_v2",
                             num_nextn_predict_layers=0)
    model = Transformer(cfg)
    assert hasattr(model.layers[0].self_attn, "q_proj")
    out = model(torch.randint(0, 512, (1, 8)))
    assert out.logits.shape == (1, 8, 512) and out.mtp_logits == []


def test_attn_mask_packs_two_sequences_into_one_row():
    """A row holding two sequences, each seeing only itself (attn_mask) at its own positions, gives each
    sequence's logits from its own forward; a causal mask is the default forward."""
    model = tiny_model()
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 5))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    seg = torch.tensor([0] * 7 + [1] * 5)
    mask = (torch.ones(12, 12, dtype=torch.bool).tril() & (seg[:, None] == seg[None, :]))[None]
    with torch.no_grad():
        packed = model(row, positions, mtp=False, attn_mask=mask).logits
        torch.testing.assert_close(packed[:, :7], model(a, mtp=False).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 7:], model(b, mtp=False).logits, atol=1e-5, rtol=1e-5)
        causal = torch.ones(1, 12, 12, dtype=torch.bool).tril()
        torch.testing.assert_close(model(row, mtp=False, attn_mask=causal).logits, model(row, mtp=False).logits,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="without MTP"):
        model(row, attn_mask=mask)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(1, 12, 12\)"):
        model(row, mtp=False, attn_mask=mask[:, :5])
    blind = mask.clone()
    blind[0, 9] = False
    with pytest.raises(ValueError, match="query 9 of row 0 sees no key"):
        model(row, positions, mtp=False, attn_mask=blind)
