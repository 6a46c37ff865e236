"""quantize(model, spec): which modules it swaps, and the quantized model against the plain model holding the
dequantized weights: the same logits, cached decoding equal to the full forward, MTP speculation."""

import copy

import pytest
import torch
from torch import nn

from nanoseek.infer.engine import Engine, generate
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.head import Head
from nanoseek.quant import QuantExperts, QuantLinear, Spec, nbytes, parse, quantize
from tests.conftest import tiny_model
from tests.infer.test_engine import PROMPTS, greedy_by_recompute

SPECS = [Spec(8), Spec(4, 32)]


def dequantized_twin(plain: nn.Module, quantized: nn.Module) -> nn.Module:
    """A copy of the plain model whose weights are the quantized model's, dequantized."""
    twin = copy.deepcopy(plain)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, QuantLinear):
                twin.get_submodule(name).weight.copy_(m.dequantize())
            elif isinstance(m, QuantExperts):
                for which in ("gate_up_proj", "down_proj"):
                    getattr(twin.get_submodule(name), which).copy_(m.dequantize(which))
    return twin


def test_what_is_quantized_and_what_is_kept():
    model = quantize(tiny_model(), Spec(4, 32))
    a, moe = model.layers[1].self_attn, model.layers[1].mlp
    for m in (a.q_a_proj, a.q_b_proj, a.kv_a_proj_with_mqa, a.o_proj, moe.shared_experts.down_proj,
              model.layers[0].mlp.gate_proj, model.mtp[0].eh_proj):
        assert type(m) is QuantLinear
    assert type(moe.experts) is QuantExperts
    assert type(a.kv_b_proj) is nn.Linear and type(model.lm_head) is Head
    assert moe.gate.weight.dtype == torch.float32 and isinstance(model.embed_tokens, nn.Embedding)
    assert {name.rpartition(".")[2] for name, m in model.named_modules() if type(m) is nn.Linear} == {"kv_b_proj"}
    with_head = quantize(tiny_model(), Spec(8, head=True))
    assert type(with_head.lm_head) is QuantLinear
    assert nbytes(with_head) < nbytes(model) * 1.5 < nbytes(tiny_model())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_logits_equal_the_dequantized_models(spec):
    plain = tiny_model()
    q = quantize(copy.deepcopy(plain), spec)
    twin = dequantized_twin(plain, q)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, twin(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_cached_quantized_decoding_equals_its_full_forward(spec):
    model = quantize(tiny_model(), spec)
    prompts = [PROMPTS[0], PROMPTS[3]]
    out = generate(model, prompts, SamplingParams(max_tokens=64))
    for p, o in zip(prompts, out):
        assert o == greedy_by_recompute(model, p, 64)


def test_mtp_speculation_on_a_quantized_model_equals_its_greedy():
    model = quantize(tiny_model(), Spec(4, 32))
    plain = generate(model, PROMPTS, SamplingParams(max_tokens=16))
    engine = Engine(model, max_batch=4, speculative=True)
    reqs = [engine.add(p, SamplingParams(max_tokens=16)) for p in PROMPTS]
    engine.run()
    assert [r.tokens for r in reqs] == plain and engine.stats["drafted"] > 0


def test_a_weight_takes_the_largest_group_that_divides_it():
    """Groups of 128 where they fit; q_a_proj (K = 64) in 64s, q_b_proj and the experts' down_proj (K = 32) in 32s."""
    model = quantize(tiny_model(), Spec(4, 128))
    attn = model.layers[0].self_attn
    assert 64 // attn.q_a_proj.scales.shape[0] == 64 and 32 // attn.q_b_proj.scales.shape[0] == 32


def test_a_weight_no_group_divides_names_the_tensor_and_changes_nothing():
    model = tiny_model(q_lora_rank=48)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_b_proj\.weight \(96, 48\): no int4 group size"):
        quantize(model, Spec(4, 128))
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())


def test_parse():
    assert parse(None) is None and parse("auto") is None  # as stored (a GGUF file's blocks kept)
    assert parse("none") == "none"  # nothing quantized (a GGUF file's blocks dequantized)
    assert parse("int8") == Spec(8) and parse("int4", 64) == Spec(4, 64)
    with pytest.raises(ValueError, match="must be one of int8, int4, auto or none"):
        parse("int3")
