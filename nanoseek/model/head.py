"""The output head and its next-token loss (DeepSeek-V3 report §2.2 and §4.2: the main loss and each MTP depth's).

    logits = h W^T;   loss = mean_n [logsumexp(logits_n) - logits_{n, y_n}]   over targets y_n != ignore_index

`Head` is nn.Linear (state-dict name `lm_head.weight`) plus `losses`: one mean cross-entropy per (h, target)
pair against the same weight (the main head and MTP's depths share it), in fp32, `CHUNK` rows at a time so
that evaluation never holds the whole (tokens, V) logits. The fused CPU kernel that never holds them in
training either is applied from outside (nanoseek/kernels/head.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 4096  # rows of logits per cross-entropy call


class Head(nn.Linear):
    def losses(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = -100
               ) -> tuple[torch.Tensor, ...]:
        """pairs of h (..., H) and target (...) -> one mean cross-entropy each (0 where no target counts)."""
        return tuple(head_loss(h, self.weight, target, ignore_index) for h, target in pairs)


def head_loss(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of h (..., H) @ weight (V, H)^T against target (...), the logits in fp32."""
    h, target = h.reshape(-1, h.shape[-1]), target.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, h.shape[0], CHUNK):
            logits = F.linear(h[i:i + CHUNK].float(), weight.float())
            total = total + F.cross_entropy(logits, target[i:i + CHUNK], ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)
