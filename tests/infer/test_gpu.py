"""Decoding on a CUDA GPU (skipped without one): cached steps against the full forward, and the engine
(continuous batching, the fastpath decoder, MTP speculation) against greedy recomputation."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.infer.engine import Engine, generate
from nanoseek.infer.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.infer.test_engine import PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_cached_decode_equals_the_full_forward(preset):
    """fp32 (in bf16 a random router's near-ties flip expert choices between the two paths)."""
    torch.manual_seed(0)
    model = (tiny_model() if preset == "tiny" else Transformer(ModelConfig.preset(preset)).eval()).cuda()
    seq = torch.randint(3, model.config.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        full = model(seq).logits
        cache = model.new_cache(2, seq.shape[1])
        pre = model(seq[:, :32], torch.arange(32, device="cuda").expand(2, 32), cache, mtp=False).logits
        torch.testing.assert_close(pre, full[:, :32], atol=1e-4, rtol=0)
        for i in range(32, seq.shape[1]):  # the absorbed path, one token at a time
            step = model(seq[:, i:i + 1], torch.full((2, 1), i, device="cuda"), cache, mtp=False).logits[:, 0]
            torch.testing.assert_close(step, full[:, i], atol=1e-4, rtol=0)


def test_engine_greedy_equals_full_recomputation():
    model = tiny_model().cuda()
    out = generate(model, PROMPTS, SamplingParams(max_tokens=12))
    with torch.no_grad():
        for prompt, got in zip(PROMPTS, out):
            seq = list(prompt)
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
            assert got == seq[len(prompt):]
    engine = Engine(model, max_batch=3, speculative=True)
    reqs = [engine.add(p, SamplingParams(max_tokens=12)) for p in PROMPTS]
    engine.run()
    assert [r.tokens for r in reqs] == out  # MTP speculation changes no greedy token
