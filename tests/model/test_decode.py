"""The decoding plan (model/decode.py) computes what the modules compute, and notices when it is out of date."""

import pytest
import torch

from nanoseek.config import yarn_example
from nanoseek.model import decode, norm
from nanoseek.model.fp8_linear import to_fp8
from nanoseek.model.linear import Linear
from tests.conftest import tiny_model


def _steps(model, ids, prefill, s):
    """Prefill `prefill` tokens, then feed s tokens per forward; returns the logits of every forward after the
    prefill and the MTP drafts at each step, concatenated along the sequence."""
    b, T = ids.shape
    cache = model.new_cache(b, T)
    pos = torch.arange(T)[None].expand(b, T)
    out = model(ids[:, :prefill], pos[:, :prefill], cache)
    logits, drafts = [], []
    for i in range(prefill, T - s + 1, s):
        out = model(ids[:, i:i + s], pos[:, i:i + s], cache)
        logits.append(out.logits)
        at = torch.arange(b)[:, None] % s if i % 2 else None  # per-row positions of the draft, or all
        nxt = ids[:, i + 1:i + s + 1] if i + s < T else ids[:, i:i + s]
        d = model.draft(out.hidden, nxt, pos[:, i:i + s], cache, at)
        drafts.append(d if at is None else d.expand(-1, s, -1))
    return torch.cat(logits, 1), torch.cat(drafts, 1)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"rope_interleave": False},
                                       {"rope_scaling": yarn_example(original=16)}])
@pytest.mark.parametrize("b, s", [(1, 1), (1, 2), (3, 1), (2, 3)])
def test_plan_equals_modules(overrides, b, s, monkeypatch):
    """Latent-cache steps through the plan (2-D rows, shared operands, RoPE matrices, direct experts up to 4
    tokens) give the module path's logits and MTP drafts."""
    model = tiny_model(**overrides)
    ids = torch.randint(0, model.config.vocab_size, (b, 20))
    with torch.no_grad():
        assert decode.plan_for(model) is not None
        planned = _steps(model, ids, 8, s)
        monkeypatch.setattr(decode, "plan_for", lambda m: None)
        modules = _steps(model, ids, 8, s)
    for a, m in zip(planned, modules):
        torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


def test_plan_follows_the_parameters():
    """In-place updates are read through the plan's views; replaced modules, moved weights or another thread
    count give a new plan; FP8 layers decode through their modules."""
    model = tiny_model()
    plan = decode.plan_for(model)
    assert decode.plan_for(model) is plan
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.mul_(2)  # an optimizer step, load_state_dict
    assert decode.plan_for(model) is plan
    model.layers[1].self_attn.o_proj = Linear(*model.layers[1].self_attn.o_proj.weight.shape[::-1], bias=False)
    plan2 = decode.plan_for(model)
    assert plan2 is not plan and plan2.layers[1].o[0] is model.layers[1].self_attn.o_proj.weight
    model.double()
    assert decode.plan_for(model) is not plan2 and decode.plan_for(model).embed.dtype == torch.float64
    threads = torch.get_num_threads()
    plan3 = decode.plan_for(model)
    try:
        torch.set_num_threads(threads + 1)
        assert decode.plan_for(model) is not plan3
    finally:
        torch.set_num_threads(threads)
    assert decode.plan_for(to_fp8(tiny_model())) is None


def test_plan_tracks_in_place_updates_in_its_output():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        before, _ = _steps(model, ids, 6, 1)
        for p in model.parameters():
            p.mul_(1.5)
        after, _ = _steps(model, ids, 6, 1)
        full = model(ids).logits[:, 6:]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("direct", [True, False])
def test_plan_without_row_blocks(direct, monkeypatch):
    """One thread: no per-thread row blocks (as on GPUs), the routed experts directly (one GEMV per product) or
    through Experts.forward (as on GPUs): the module path's logits."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            plan = decode.plan_for(model)
            for layer in plan.layers + [m[3] for m in plan.mtp]:
                if isinstance(layer.ffn, decode._MoE):
                    assert layer.ffn.blocks == 0
                    layer.ffn.direct_rows = 4 if direct else 0
            planned = _steps(model, ids, 6, 1 + direct)
            monkeypatch.setattr(decode, "plan_for", lambda m: None)
            modules = _steps(model, ids, 6, 1 + direct)
    finally:
        torch.set_num_threads(threads)
    for a, m in zip(planned, modules):
        torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


def test_rms_norm_as_layer_norm():
    x, w = torch.randn(3, 64) * 5, torch.randn(64)
    torch.testing.assert_close(decode.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6))
    torch.testing.assert_close(decode.rms_norm(x * 1e-4, w, 1e-2), norm.rms_norm(x * 1e-4, w, 1e-2))  # eps counts
