"""Shared-prompt packing (rl/packing.py): a group's completions in one row give the log-probs, entropies and
gradients of their own rows; `pays` packs short completions of a shared prompt, not long ones."""

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.rl.grpo import token_logprobs
from nanoseek.rl.loop import pack
from nanoseek.rl.packing import Packed, pays


def grouped(vocab: int, sizes=(3, 2), seed: int = 0):
    """Right-padded rows: groups of `sizes` completions, each group with its own prompt; the loss mask."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for size in sizes:
        p = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        for _ in range(size):
            prompts.append(p)
            completions.append(torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),),
                                             generator=g).tolist())
    ids, mask = pack(prompts, completions, [False] * len(prompts), pad_id=0, mask_truncated=True)
    seq_len = torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions)])
    return ids, mask, seq_len, torch.tensor(list(map(len, prompts)))


def test_packed_rows_give_each_sequences_own_logprobs_and_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    ids, mask, seq_len, prompt_len = grouped(model.config.vocab_size)
    packed = Packed.build(ids, seq_len, prompt_len, [3, 2])
    assert packed.ids.shape[0] == 2 and packed.ids.shape[1] == max(
        int(prompt_len[s]) + int((seq_len[s:s + n] - prompt_len[s]).sum()) for s, n in ((0, 3), (3, 2)))
    weights = torch.randn(mask.shape)
    grads = []
    for p in (None, packed):
        model.zero_grad()
        logp, ent = token_logprobs(model, ids, mask, entropy=True, packed=p)
        (logp * weights).sum().backward()
        grads.append([q.grad.clone() for q in model.parameters() if q.grad is not None])
        if p is None:
            want = logp.detach(), ent
    torch.testing.assert_close(logp.detach(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want[1], atol=1e-5, rtol=1e-5)
    assert (logp != 0).sum() == mask.sum()
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_pays_for_short_completions_of_a_shared_prompt_not_long_ones():
    nano, small = ModelConfig.preset("nano"), ModelConfig.preset("small")
    assert pays(nano, 20, [24] * 8)  # the demo: ~20-token prompts, ~24-token completions
    assert not pays(small, 30, [170] * 8)  # 256-token rollouts: S^2 attention over ~1,400 tokens costs more
    assert not pays(nano, 2, [60, 60])  # little prompt to share
