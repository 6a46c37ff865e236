"""The GRPO update (rl/loop.py): micro-batches sorted by length and cut to their own width, without the
sequences that carry no loss token, give the update of one full-width pass over the whole batch."""

import copy

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.rl.grpo import GRPOConfig, policy_loss, token_logprobs
from nanoseek.rl import loop
from nanoseek.rl.loop import Rollout, micro_batches, pack, update


def rollout(vocab: int, seed: int = 0, groups: int = 8) -> Rollout:
    """8 sequences in `groups` groups of completions that share their prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 7, (groups,),
                                                                                                 generator=g)]
    prompts = [p for p in prompts for _ in range(8 // groups)]
    completions = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in [1, 9, 2, 5, 12, 3, 7, 4]]
    truncated = [False] * 7 + [True]
    ids, mask = pack(prompts, completions, truncated, pad_id=0, mask_truncated=True)
    return Rollout(ids, mask, [""] * 8, [len(c) for c in completions], truncated, sum(map(len, prompts)),
                   [len(p) + len(c) for p, c in zip(prompts, completions)])


def test_micro_batches_sort_by_length_and_cut_the_padding(monkeypatch):
    monkeypatch.setattr(loop, "MICRO_BATCH_COST", 4)
    seq_len = torch.tensor([5, 9, 3, 7, 8, 40])
    cfg = GRPOConfig(micro_batch=3)
    got = [(m.tolist(), w) for m, w in micro_batches(torch.arange(6), seq_len, cfg)]
    # the long sequence alone; the others by length, at most 3 per micro-batch: 2*5+4 + 3*9+4 + 40+4
    assert got == [([2, 0], 5), ([3, 4, 1], 9), ([5], 40)]
    assert sorted(i for m, _ in got for i in m) == list(range(6))
    # with a high fixed cost per micro-batch, fewer and wider ones
    monkeypatch.setattr(loop, "MICRO_BATCH_COST", 1000)
    assert [(m.tolist(), w) for m, w in micro_batches(torch.arange(6), seq_len, cfg)] == [([2, 0, 3], 7), ([4, 1, 5], 40)]
    # micro_token: the loss depends on the grouping, so the drawn order stays
    cfg = GRPOConfig(micro_batch=2, loss_agg="micro_token")
    assert [(m.tolist(), w) for m, w in micro_batches(torch.tensor([4, 2, 0, 1, 3]), seq_len, cfg)] == \
        [([4, 2], 8), ([0, 1], 9), ([3], 7)]


@pytest.mark.parametrize("loss_agg,groups", [("sequence", 8), ("token", 8), ("constant", 8), ("sequence", 2),
                                              ("token", 2), ("constant", 2)])
def test_update_equals_one_full_width_pass(loss_agg, groups):
    """Also with prompts shared by groups of 4 completions: packed rows (rl/packing.py), 2 groups per
    micro-batch of up to 8 sequences, one more with 3 (the truncated completion is not run)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    ref = copy.deepcopy(model)
    batch = rollout(model.config.vocab_size, groups=groups)
    adv = torch.randn(8)
    cfg = GRPOConfig(micro_batch=3 if groups == 8 else 8, loss_agg=loss_agg, max_completion_tokens=12)
    cfg.optim.grad_clip = 0.0
    rows = batch.mask.any(dim=1).nonzero()[:, 0]
    seq_len = torch.tensor(batch.seq_lengths)
    got = loop.plan(rows, batch.ids, seq_len, seq_len - torch.tensor(batch.lengths), cfg, model.config)
    assert [sizes for _, _, sizes in got] == ([None] * len(got) if groups == 8 else [[4, 3]])
    update(model, torch.optim.SGD(model.parameters(), lr=1.0), None, batch, adv, cfg, step=0)

    ref.train()
    logp, _ = token_logprobs(ref, batch.ids, batch.mask)
    norm = {"sequences": 8, "tokens": int(batch.mask.sum()), "micro_batches": 1}
    loss, _ = policy_loss(logp, logp.detach(), adv, batch.mask, cfg, norm)
    loss.backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        expected = p.detach() - (p.grad if p.grad is not None else 0)
        torch.testing.assert_close(q.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ref.parameters())


def test_sequences_without_a_loss_token_are_not_run():
    """A batch of truncated completions only (all masked): no forward runs and the weights stay."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    batch = rollout(model.config.vocab_size)
    batch.mask[:] = False
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = GRPOConfig(micro_batch=3, max_completion_tokens=12)
    update(model, torch.optim.SGD(model.parameters(), lr=1.0), None, batch, torch.randn(8), cfg, step=0)
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_flops_count_a_packed_groups_prompt_once():
    model_cfg = ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    batch = rollout(model_cfg.vocab_size, groups=2)
    cfg = GRPOConfig(micro_batch=8, max_completion_tokens=12)
    packed = loop._flops(cfg, model_cfg, batch, ref=False)
    plain = loop._flops(GRPOConfig(micro_batch=8, max_completion_tokens=12, pack_prompts=False), model_cfg, batch,
                        ref=False)
    prompts = [s - n for s, n in zip(batch.seq_lengths, batch.lengths)]
    # group 1: 4 rows run; group 2: 3 (its truncated completion carries no loss)
    saved = 3 * prompts[0] + 2 * prompts[4]
    per_token = loop.train_flops_per_token(model_cfg, batch.ids.shape[1]).total
    assert plain - packed == pytest.approx(saved * per_token)
