import pytest
import torch

from nanoseek.infer.engine import SamplingParams, generate, sample
from tests.conftest import tiny_model


def greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_greedy_equals_full_recomputation():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300]]
    out = generate(model, prompts, SamplingParams(max_tokens=12))
    for p, o in zip(prompts, out):
        assert o == greedy_by_recompute(model, p, 12)


def test_stop_ids_end_a_row():
    model = tiny_model()
    full = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8))[0]
    stop = full[3]
    cut = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8), stop_ids=(stop,))[0]
    assert cut == full[: full.index(stop) + 1]


def test_sampling_is_seeded():
    model = tiny_model()
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(model, [[1, 2], [3, 4, 5]], p)
    assert a == generate(model, [[1, 2], [3, 4, 5]], p)
    assert a != generate(model, [[1, 2], [3, 4, 5]], SamplingParams(max_tokens=10, temperature=1.0, seed=8))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert set(k2.tolist()) == {0, 1}
    p = torch.tensor([4.0, 3.0, 2.0, -5.0, -6.0]).softmax(-1)
    nucleus = sample(logits, SamplingParams(temperature=1.0, top_p=float(p[0] + 0.01)), g)
    assert set(nucleus.tolist()) == {0, 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens=0 must be >= 1"),
    (dict(temperature=-1), "temperature=-1 must be >= 0"),
    (dict(top_p=0), "top_p=0 must be in \\(0, 1\\]"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_context_overflow_is_reported():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the context of 512 tokens"):
        generate(model, [[1] * 500], SamplingParams(max_tokens=20))
