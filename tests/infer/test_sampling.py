"""Sampling under extreme values: nothing a request can set, and no logit the model can produce, makes NaN."""

import pytest
import torch

from nanoseek.infer.sampling import SamplingParams, distributions, draw, guard, logprobs

EXTREME = [SamplingParams(temperature=1e-60), SamplingParams(temperature=1e-5), SamplingParams(temperature=2.0),
           SamplingParams(temperature=1.0, top_p=1e-30), SamplingParams(temperature=1.0, top_p=5e-324),
           SamplingParams(temperature=0.7, top_k=10**18),
           SamplingParams(temperature=2.0, top_k=1, top_p=1e-30)]


def extreme_logits(V=50):
    rows = [torch.randn(V) * 1e30, torch.full((V,), -1e38), torch.randn(V)]
    with_inf = torch.randn(V)
    with_inf[[3, 9]] = float("inf")
    with_nan = torch.randn(V)
    with_nan[::2] = float("nan")
    mixed = torch.full((V,), float("-inf"))
    mixed[7] = -3.0e38
    return torch.stack(rows + [with_inf, with_nan, mixed])


@pytest.mark.parametrize("params", EXTREME, ids=lambda p: f"T={p.temperature},p={p.top_p},k={p.top_k}")
def test_distributions_stay_finite_on_extreme_logits(params):
    logits, bad = guard(extreme_logits())
    assert not bad.any()
    probs = distributions(logits, [params] * len(logits))
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(logits)))
    tokens = draw(probs, [params] * len(logits), [torch.Generator().manual_seed(0)] * len(logits))
    assert (probs[torch.arange(len(logits)), tokens] > 0).all()
    assert int(tokens[5]) == 7  # the only finite logit
    if params.greedy or params.top_k == 1:
        assert (logits[torch.arange(len(logits)), tokens] == logits.amax(-1)).all()  # an argmax (row 1 ties)


def test_guard_flags_rows_without_a_finite_logit_and_keeps_clean_logits_as_they_are():
    logits = torch.randn(3, 10)
    same, bad = guard(logits)
    assert same.data_ptr() == logits.data_ptr() and not bad.any()
    logits[1] = float("nan")
    logits[2, :] = float("-inf")
    guarded, bad = guard(logits)
    assert bad.tolist() == [False, True, True] and not torch.isnan(guarded).any()


def test_temperature_floor_is_greedy():
    assert SamplingParams(temperature=1e-60).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(4, 30)
    tokens = torch.tensor([0, 5, 29, 7])
    chosen, ids, values = logprobs(logits, tokens, top=3)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(torch.tensor(chosen), ref[torch.arange(4), tokens])
    assert ids == ref.topk(3).indices.tolist()
    torch.testing.assert_close(torch.tensor(values), ref.topk(3).values)


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """Inverse-CDF draws: frequencies within 4 sigma of p over 20k rows; tokens of probability 0 never come."""
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 20000
    params = [SamplingParams(temperature=1.0)] * n
    gens = [torch.Generator().manual_seed(0)] * n  # one generator, advanced row by row
    tokens = draw(p.expand(n, -1).clone(), params, gens)
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[p == 0].sum() == 0
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4 * sigma + 1e-12).all(), freq
    # seeded: the same generators give the same tokens
    again = draw(p.expand(n, -1).clone(), params, [torch.Generator().manual_seed(0)] * n)
    assert torch.equal(tokens, again)
