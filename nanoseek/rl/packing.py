"""Shared-prompt packing for the GRPO update: the completions of one prompt as one row.

The G completions c_1..c_G of a prompt P (p tokens) share their first p tokens. Packed, the group is one row

    P c_1 c_2 ... c_G       positions 0..p-1, then p, p+1, .. again for each completion

where query i sees key j iff j <= i and j lies in P or in i's own completion. Each completion then attends to
exactly what it sees in its own row, at the same positions, so every logit equals the unpacked forward's;
the prompt's forward and backward run once per group instead of G times (autograd sums its gradient over
the G completions). A packed row's attention is a dense masked product, S^2 scores for S = p + sum |c_g|
where G rows of their own cost G causal (p + |c|)^2 / 2, so a group is packed only where that costs fewer
model FLOPs (`pays`, with nanoseek.cost's formula): short completions of a long-ish prompt (the demo), not
256-token ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.config import ModelConfig
from nanoseek.cost import train_flops_per_token


def pays(cfg: ModelConfig, prompt: int, completions: list[int]) -> bool:
    """Fewer forward + backward FLOPs packed (one row of p + sum L tokens, attention over all of it) than
    as len(completions) causal rows of p + L tokens. The head is left out: it runs on the completion columns
    either way."""
    head = 6 * cfg.vocab_size * cfg.hidden_size

    def per_token(s: int, causal: bool) -> float:
        return train_flops_per_token(cfg, s, causal).total - head

    rows = sum((prompt + n) * per_token(prompt + n, True) for n in completions)
    S = prompt + sum(completions)
    return S * per_token(S, False) < rows


@dataclass
class Packed:
    ids: torch.Tensor  # (R, S) one row per group, right-padded
    positions: torch.Tensor  # (R, S)
    mask: torch.Tensor  # (R, S, S) True where query i sees key j
    where: torch.Tensor  # (n, s): column j of sequence n is packed position where[n, j] of the flat (R S)

    @classmethod
    def build(cls, ids: torch.Tensor, seq_len: torch.Tensor, prompt_len: torch.Tensor, sizes: list[int]) -> Packed:
        """ids (n, s): right-padded sequences (seq_len tokens each) in consecutive groups of `sizes` rows whose
        first prompt_len tokens are the same. A column past a sequence's end maps to its last token."""
        n, s = ids.shape
        seq_len, prompt_len = seq_len.tolist(), prompt_len.tolist()
        col = torch.arange(s)
        rows, where, start = [], torch.empty(n, s, dtype=torch.long), 0
        for size in sizes:
            p = prompt_len[start]
            tok, pos, seg, off = [ids[start, :p]], [torch.arange(p)], [torch.full((p,), -1)], p
            for g, r in enumerate(range(start, start + size)):
                L = seq_len[r] - p
                tok.append(ids[r, p:p + L])
                pos.append(torch.arange(p, p + L))
                seg.append(torch.full((L,), g))
                where[r] = torch.where(col < p, col, (off + col - p).clamp(max=off + L - 1))
                off += L
            rows.append((torch.cat(tok), torch.cat(pos), torch.cat(seg)))
            start += size
        S = max(len(t) for t, _, _ in rows)
        R = len(rows)
        packed = torch.zeros(R, S, dtype=ids.dtype)
        positions = torch.zeros(R, S, dtype=torch.long)
        segment = torch.full((R, S), -2)  # -1: the prompt, g: completion g, -2: padding (sees only padding)
        for i, (t, p, g) in enumerate(rows):
            packed[i, :len(t)], positions[i, :len(t)], segment[i, :len(t)] = t, p, g
        start = 0
        for i, size in enumerate(sizes):  # each sequence's columns into the flat (R S) positions
            where[start:start + size] += i * S
            start += size
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        sees = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])
        dev = ids.device
        return cls(packed.to(dev), positions.to(dev), (causal & sees).to(dev), where.to(dev))

    def hidden(self, model, columns: slice) -> torch.Tensor:
        """The model's final hidden states (n, columns, H) at each sequence's columns, from the packed rows."""
        out = model(self.ids, self.positions, mtp=False, attn_mask=self.mask,
                    logits_at=self.ids.new_zeros(len(self.ids), 0))
        return out.hidden.flatten(0, 1)[self.where[:, columns]]
