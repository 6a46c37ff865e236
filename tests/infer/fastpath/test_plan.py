"""The decoding plan (infer/fastpath/plan.py, entered through `Decoder`) computes what the plain reference model
computes, and notices when it is out of date."""

import pytest
import torch
from torch import nn

from nanoseek.config import yarn_example
from nanoseek.infer.fastpath import Decoder, plan_for
from nanoseek.infer.fastpath import plan as plan_mod
from nanoseek.model.fp8_linear import to_fp8
from tests.conftest import tiny_model


def _steps(model, ids, prefill, s, fast: bool):
    """Prefill `prefill` tokens, then feed s tokens per forward, through the Decoder (fast) or the reference
    model; returns the logits of every forward after the prefill and the MTP drafts at each step, concatenated
    along the sequence."""
    forward = Decoder(model) if fast else model
    b, T = ids.shape
    cache = model.new_cache(b, T)
    pos = torch.arange(T)[None].expand(b, T)
    out = forward(ids[:, :prefill], pos[:, :prefill], cache)
    logits, drafts = [], []
    for i in range(prefill, T - s + 1, s):
        out = forward(ids[:, i:i + s], pos[:, i:i + s], cache)
        logits.append(out.logits)
        at = torch.arange(b)[:, None] % s if i % 2 else None  # per-row positions of the draft, or all
        nxt = ids[:, i + 1:i + s + 1] if i + s < T else ids[:, i:i + s]
        d = forward.draft(out.hidden, nxt, pos[:, i:i + s], cache, at)
        drafts.append(d if at is None else d.expand(-1, s, -1))
    return torch.cat(logits, 1), torch.cat(drafts, 1)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"rope_interleave": False},
                                       {"rope_scaling": yarn_example(original=16)}])
@pytest.mark.parametrize("b, s", [(1, 1), (1, 2), (3, 1), (2, 3)])
def test_plan_equals_modules(overrides, b, s):
    """Latent-cache steps through the plan (2-D rows, shared operands, RoPE matrices, direct experts up to 4
    tokens, grouped experts past that) give the reference model's logits and MTP drafts."""
    model = tiny_model(**overrides)
    ids = torch.randint(0, model.config.vocab_size, (b, 20))
    with torch.no_grad():
        assert plan_for(model) is not None
        planned = _steps(model, ids, 8, s, fast=True)
        modules = _steps(model, ids, 8, s, fast=False)
    for a, m in zip(planned, modules):
        torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


def test_plan_follows_the_parameters():
    """In-place updates are read through the plan's views; replaced modules, moved weights or another thread
    count give a new plan; FP8 layers decode through their modules."""
    model = tiny_model()
    plan = plan_for(model)
    assert plan_for(model) is plan
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.mul_(2)  # an optimizer step, load_state_dict
    assert plan_for(model) is plan
    model.layers[1].self_attn.o_proj = nn.Linear(*model.layers[1].self_attn.o_proj.weight.shape[::-1], bias=False)
    plan2 = plan_for(model)
    assert plan2 is not plan and plan2.layers[1].o[0] is model.layers[1].self_attn.o_proj.weight
    model.double()
    assert plan_for(model) is not plan2 and plan_for(model).embed.dtype == torch.float64
    threads = torch.get_num_threads()
    plan3 = plan_for(model)
    try:
        torch.set_num_threads(threads + 1)
        assert plan_for(model) is not plan3
    finally:
        torch.set_num_threads(threads)
    assert plan_for(to_fp8(tiny_model())) is None


def test_plan_tracks_in_place_updates_in_its_output():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        before, _ = _steps(model, ids, 6, 1, fast=True)
        for p in model.parameters():
            p.mul_(1.5)
        after, _ = _steps(model, ids, 6, 1, fast=True)
        full = model(ids).logits[:, 6:]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("direct", [True, False])
def test_plan_without_row_blocks(direct):
    """One thread: no per-thread row blocks (as on GPUs), the routed experts directly (one GEMV per product) or
    grouped by expert: the reference model's logits."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            plan = plan_for(model)
            for layer in plan.layers + [m[3] for m in plan.mtp]:
                if isinstance(layer.ffn, plan_mod._MoE):
                    assert layer.ffn.blocks == 0
                    layer.ffn.direct_rows = 4 if direct else 0
            planned = _steps(model, ids, 6, 1 + direct, fast=True)
            modules = _steps(model, ids, 6, 1 + direct, fast=False)
    finally:
        torch.set_num_threads(threads)
    for a, m in zip(planned, modules):
        torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


def test_the_decoder_takes_the_plan_for_cached_steps_of_few_tokens_only():
    """Prefill (a fresh cache), steps past absorb_max_query and autograd go through the model; a cached step of
    a few tokens and its MTP draft do not call the model's forward or draft at all."""
    model = tiny_model()
    calls = []
    for name in ("forward", "draft"):
        method = getattr(model, name)
        setattr(model, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    decoder, cache = Decoder(model), model.new_cache(1, 64)
    pos = torch.arange(64)[None]
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    with torch.no_grad():
        out = decoder(ids[:, :8], pos[:, :8], cache)  # prefill
        assert calls == ["forward"]
        out = decoder(ids[:, 8:10], pos[:, 8:10], cache)
        decoder.draft(out.hidden, ids[:, 9:11], pos[:, 8:10], cache)
        assert calls == ["forward"]  # the plan
        s = model.layers[0].self_attn.absorb_max_query + 1
        decoder(ids[:, 10:10 + s], pos[:, 10:10 + s], cache)
        assert calls == ["forward", "forward"]
    decoder(ids[:, 40:41], pos[:, 40:41], cache)  # autograd on: the model
    assert calls == ["forward", "forward", "forward"]
