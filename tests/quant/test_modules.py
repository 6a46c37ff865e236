"""QuantLinear and QuantExperts compute what nn.Linear and Experts compute on the dequantized weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import ModelConfig
from nanoseek.model.moe import Experts
from nanoseek.quant import Spec
from nanoseek.quant.modules import QuantExperts, QuantLinear

SPECS = [Spec(8), Spec(4, 32), Spec(4, 64)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(3, 128), (2, 5, 128)])
def test_linear_equals_the_dequantized_weights_linear(spec, shape):
    plain = nn.Linear(128, 72, bias=False)  # 72: int4 pads the rows to 80 and cuts them again
    q = QuantLinear(128, 72, spec, torch.float32)
    q.set_weight(plain.weight.detach())
    x = torch.randn(shape)
    y = q(x)
    assert y.shape == (*shape[:-1], 72)
    torch.testing.assert_close(y, F.linear(x, q.dequantize()), atol=1e-4, rtol=1e-4)
    assert (q.dequantize() - plain.weight).abs().max() < 0.2  # and it is the weight, quantized
    assert q.nbytes() == sum(b.numel() * b.element_size() for b in q.buffers())


def test_bf16_activations_stay_bf16():
    q = QuantLinear(64, 32, Spec(4, 32), torch.bfloat16)
    q.set_weight(torch.randn(32, 64))
    assert q(torch.randn(4, 64)).dtype == torch.bfloat16  # fp32 input is cast to the model's dtype


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_experts_equal_the_dequantized_experts(spec):
    cfg = ModelConfig.preset("tiny", n_routed_experts=6, n_group=2, topk_group=1, moe_intermediate_size=64)
    plain = Experts(cfg)
    nn.init.normal_(plain.gate_up_proj, std=0.1)
    nn.init.normal_(plain.down_proj, std=0.1)
    q = QuantExperts(6, cfg.hidden_size, 64, spec, torch.float32)
    q.set_weight("gate_up_proj", plain.gate_up_proj.detach())
    q.set_weight("down_proj", plain.down_proj.detach())
    with torch.no_grad():
        plain.gate_up_proj.copy_(q.dequantize("gate_up_proj"))
        plain.down_proj.copy_(q.dequantize("down_proj"))
    x = torch.randn(9, cfg.hidden_size)
    idx = torch.tensor([[0, 1]] * 4 + [[1, 2]] * 5)  # experts 3-5 get no token
    w = torch.rand(9, 2)
    with torch.no_grad():
        want, want_counts = plain(x, idx, w)
    got, counts = q(x, idx, w)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(counts, want_counts)
    assert q.nbytes() == sum(b.numel() * b.element_size() for b in q.buffers())
