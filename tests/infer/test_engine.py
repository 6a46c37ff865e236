import pytest
import torch

from nanoseek.infer.engine import Engine, generate
from nanoseek.infer.sampling import SamplingParams, accept, distributions, sample
from tests.conftest import tiny_model


def greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300], list(range(40, 70))]


def test_batched_greedy_equals_full_recomputation():
    model = tiny_model()
    out = generate(model, PROMPTS, SamplingParams(max_tokens=12))
    for p, o in zip(PROMPTS, out):
        assert o == greedy_by_recompute(model, p, 12)


def test_cached_decode_logits_equal_full_forward():
    model = tiny_model()
    seq = torch.tensor([PROMPTS[3] + PROMPTS[0]])
    full = model(seq).logits[0]
    cache = model.new_cache(1, seq.shape[1])
    pre = model(seq[:, :30], torch.arange(30)[None], cache, mtp=False)  # fresh prefill: causal SDPA path
    torch.testing.assert_close(pre.logits[0], full[:30], atol=1e-5, rtol=0)
    for i in range(30, seq.shape[1]):  # absorbed path, one token at a time
        step = model(seq[:, i:i + 1], torch.tensor([[i]]), cache, mtp=False).logits[0, 0]
        torch.testing.assert_close(step, full[i], atol=1e-5, rtol=0)


def test_logits_at_selects_positions():
    model = tiny_model()
    ids = torch.tensor([PROMPTS[3][:10], PROMPTS[3][10:20]])
    full = model(ids).logits
    at = torch.tensor([[9], [4]])
    torch.testing.assert_close(model(ids, logits_at=at).logits[:, 0], full[[0, 1], [9, 4]])


def test_continuous_batching_matches_one_by_one():
    """Requests join while others decode, more requests than rows, rows are reused and compacted."""
    model = tiny_model()
    lengths = [9, 3, 14, 5, 11]
    alone = [generate(model, [p], SamplingParams(max_tokens=n))[0] for p, n in zip(PROMPTS + [[7, 7]], lengths)]
    engine = Engine(model, max_batch=2)
    reqs = [engine.add(PROMPTS[0], SamplingParams(max_tokens=lengths[0]))]
    engine.step()
    engine.step()
    reqs += [engine.add(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[1:] + [[7, 7]], lengths[1:])]
    seen_batch = 0
    while engine.has_work():
        engine.step()
        seen_batch = max(seen_batch, len(engine.running))
    assert seen_batch == 2
    assert [r.tokens for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs)


def test_speculative_greedy_equals_plain_greedy():
    model = tiny_model()
    plain = generate(model, PROMPTS, SamplingParams(max_tokens=16))
    engine = Engine(model, max_batch=3, speculative=True)
    reqs = [engine.add(p, SamplingParams(max_tokens=16)) for p in PROMPTS]
    engine.run()
    assert [r.tokens for r in reqs] == plain
    assert engine.stats["drafted"] > 0 and engine.stats["tokens"] == 4 * 16


def test_speculative_mixed_greedy_and_sampled_rows():
    """A sampled request joins greedy rows that drafted greedily (no q kept, one-hot built on demand): the
    greedy rows still equal plain greedy decoding and the sampled one runs to max_tokens."""
    model = tiny_model()
    plain = generate(model, PROMPTS[:2], SamplingParams(max_tokens=12))
    engine = Engine(model, max_batch=3, speculative=True)
    greedy = [engine.add(p, SamplingParams(max_tokens=12)) for p in PROMPTS[:2]]
    engine.step()
    sampled = engine.add(PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=7))
    engine.run()
    assert [r.tokens for r in greedy] == plain
    assert len(sampled.tokens) == 12 and sampled.finish_reason == "length"


def test_speculative_with_a_perfect_draft_accepts_everything():
    """Make MTP's draft equal the main model's next-next token: copy the main model's last block into the
    MTP block and zero the token embedding path, so acceptance must be 1 and output still equals plain."""
    model = tiny_model(num_hidden_layers=2, first_k_dense_replace=1)
    seq = torch.tensor([PROMPTS[3]])
    plain = generate(model, [PROMPTS[3]], SamplingParams(max_tokens=10))[0]
    # A draft that is always right: patch draft() to recompute the true continuation
    true_next = {}
    full = PROMPTS[3] + plain
    for i in range(len(PROMPTS[3]) - 1, len(full) - 1):
        true_next[i] = full[i + 1]

    def oracle(hidden, next_ids, positions, cache, logits_at=None):
        pos = positions.gather(1, logits_at)[:, 0] + 1  # the draft predicts position pos + 1
        logits = torch.full((len(pos), 1, model.config.vocab_size), -1e9)
        for r, p in enumerate(pos.tolist()):
            logits[r, 0, true_next.get(p, 0)] = 0
        return logits

    engine = Engine(model, max_batch=1, speculative=True)
    engine.forward.draft = oracle
    req = engine.add(PROMPTS[3], SamplingParams(max_tokens=10))
    engine.run()
    assert req.tokens == plain
    assert engine.acceptance_rate == 1.0
    assert engine.stats["steps"] <= 6  # one prefill step, then two tokens per step
    del seq


def test_speculative_sampling_keeps_the_target_distribution():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    n = 40000
    g = torch.Generator().manual_seed(1)
    params = [SamplingParams(temperature=1.0)] * n
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    ok, tok = accept(p.expand(n, -1), q.expand(n, -1), draft, params, [g] * n)
    freq = torch.bincount(tok, minlength=5).float() / n
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    expected_acceptance = torch.minimum(p, q).sum()  # P(accept) = sum_x min(p(x), q(x))
    assert abs(ok.float().mean() - expected_acceptance) < 0.01


def test_distributions_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]]).repeat(4, 1)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=2.0)]
    probs = distributions(logits, params)
    assert probs[0].tolist() == [1, 0, 0, 0, 0]
    torch.testing.assert_close(probs[1, :2], logits[0, :2].softmax(-1))
    assert (probs[1, 2:] == 0).all()
    full = logits[0].softmax(-1)  # 0.705, 0.259, ...: top-p 0.8 keeps the first two
    torch.testing.assert_close(probs[2], torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    torch.testing.assert_close(probs[3], (logits[0] / 2).softmax(-1))


def test_sampling_is_seeded_per_request():
    model = tiny_model()
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(model, [[1, 2], [3, 4, 5]], p)
    assert a == generate(model, [[1, 2], [3, 4, 5]], p)
    assert a != generate(model, [[1, 2], [3, 4, 5]], SamplingParams(max_tokens=10, temperature=1.0, seed=8))
    # a request's text does not depend on what shares its batch
    assert generate(model, [[3, 4, 5]], p)[0] == a[1]


def test_sample_restricts_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * 2000, [g] * 2000)
    assert set(k2.tolist()) == {0, 1}


def test_stop_ids_end_a_row():
    model = tiny_model()
    full = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8))[0]
    stop = full[3]
    cut = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=8), stop_ids=(stop,))[0]
    assert cut == full[: full.index(stop) + 1]


def test_cancel_frees_the_row():
    model = tiny_model()
    engine = Engine(model, max_batch=1)
    a = engine.add([1, 2, 3], SamplingParams(max_tokens=50))
    b = engine.add([4, 5], SamplingParams(max_tokens=3))
    engine.step()
    assert engine.running == [a]
    a.cancelled = True
    engine.run()
    assert a.finish_reason == "cancelled" and len(a.tokens) < 50
    assert b.tokens == generate(model, [[4, 5]], SamplingParams(max_tokens=3))[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens=0 must be >= 1"),
    (dict(temperature=-1), "temperature=-1 must be >= 0"),
    (dict(top_p=0), "top_p=0 must be in \\(0, 1\\]"),
    (dict(top_k=-2), "top_k=-2 must be >= 0"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_are_reported():
    model = tiny_model()
    engine = Engine(model, max_batch=2)
    with pytest.raises(ValueError, match="exceeds the context of 512 tokens"):
        engine.add([1] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="prompt token 9999 at index 1 is outside the vocabulary"):
        engine.add([1, 9999])
    with pytest.raises(ValueError, match="empty"):
        engine.add([])
    with pytest.raises(ValueError, match="stop strings need an engine with a tokenizer"):
        engine.add([1], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="MTP"):
        Engine(tiny_model(num_nextn_predict_layers=0), speculative=True)


def faulty(engine, fault):
    """The engine's forward with `fault(ids, positions, out)` applied after each call (a fault injected into
    real runs, on the plan's path and the model's)."""
    inner = engine.forward

    class Faulty:
        draft = staticmethod(inner.draft)

        def __call__(self, ids, positions, *a, **kw):
            out = inner(ids, positions, *a, **kw)
            fault(ids, positions, out)
            return out
    engine.forward = Faulty()
    return engine


def test_a_row_without_finite_logits_ends_alone_and_the_others_go_on():
    poison = 77

    def nan_rows(ids, positions, out):
        if out.logits is not None:
            out.logits[(ids == poison).any(-1)] = float("nan")
    prompts = [PROMPTS[0], [3, poison, 4], PROMPTS[2]]
    engine = faulty(Engine(tiny_model(), max_batch=3), nan_rows)
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8), SamplingParams(max_tokens=8,
                                                                                          temperature=0.8, seed=1)]
    reqs = [engine.add(p, sp) for p, sp in zip(prompts, params)]
    engine.run()
    assert reqs[1].finish_reason == "error" and "no finite logit" in reqs[1].error and reqs[1].tokens == []
    alone = [generate(tiny_model(), [prompts[i]], params[i])[0] for i in (0, 2)]
    assert [reqs[0].tokens, reqs[2].tokens] == alone


@pytest.mark.parametrize("speculative", [False, True])
def test_a_failing_row_is_isolated_in_prefill_and_decode(speculative):
    """A forward that raises for one row (in the batch's prefill, or in a decode step at position 10) ends that
    request with "error"; the rows around it give the tokens they give alone."""
    poison = 77

    def raise_for(ids, positions, out):
        if (ids == poison).any() or (ids.shape[1] <= 2 and (positions == 10).any()):
            raise RuntimeError("injected fault")
    prompts = [PROMPTS[0], [3, poison, 4], [1], PROMPTS[2]]  # PROMPTS[0] (7 tokens) decodes position 10
    engine = faulty(Engine(tiny_model(), max_batch=4, speculative=speculative), raise_for)
    reqs = [engine.add(p, SamplingParams(max_tokens=6)) for p in prompts]
    engine.run()
    assert [r.finish_reason for r in reqs] == ["error", "error", "length", "length"]
    assert all("RuntimeError: injected fault" in reqs[i].error for i in (0, 1))
    assert [r.tokens for r in reqs[2:]] == [generate(tiny_model(), [p], SamplingParams(max_tokens=6))[0]
                                           for p in prompts[2:]]
    assert engine.running == [] and not engine.waiting


def test_logprobs_are_the_full_forwards():
    """Generated and prompt log-probs equal log_softmax of the full forward at each position."""
    model = tiny_model()
    prompt = PROMPTS[3]
    engine = Engine(model, max_batch=2)
    r = engine.add(prompt, SamplingParams(max_tokens=6, temperature=0.9, seed=5, logprobs=3, prompt_logprobs=2))
    engine.run()
    seq = prompt + r.tokens
    with torch.no_grad():
        lp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
    want = [float(lp[i - 1, seq[i]]) for i in range(1, len(seq))]
    got = [x[0] for x in r.prompt_logprobs[1:]] + [x[0] for x in r.logprobs]
    assert r.prompt_logprobs[0] is None and len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    top = lp[len(prompt) - 1].topk(3)
    assert r.logprobs[0][1] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(r.logprobs[0][2]), top.values, atol=1e-4, rtol=0)
    assert all(len(x[1]) == 2 for x in r.prompt_logprobs[1:])


def test_a_request_whose_text_cannot_be_decoded_ends_alone(monkeypatch):
    """Detokenizing fails for one request (a broken tokenizer piece): that request ends with "error", the rows
    stay as they were, the others finish as alone."""
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.train(iter(["The quick brown fox jumps over the lazy dog."] * 20), vocab_size=300)
    model = tiny_model(vocab_size=tok.vocab_size)
    engine = Engine(model, tok, max_batch=3)
    reqs = [engine.add(p, SamplingParams(max_tokens=6)) for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13])]
    push = reqs[1].stream.push
    monkeypatch.setattr(reqs[1].stream, "push", lambda ids, final=False: push(ids, final) if len(
        reqs[1].tokens) < 3 else 1 / 0)
    engine.run()
    assert reqs[1].finish_reason == "error" and "ZeroDivisionError" in reqs[1].error
    for r, p in ((reqs[0], [5, 6, 7]), (reqs[2], [10, 11, 12, 13])):
        assert r.tokens == generate(model, [p], SamplingParams(max_tokens=6))[0]
