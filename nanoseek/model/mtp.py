"""Multi-Token Prediction (DeepSeek-V3 report §2.2).

Module k = 1..D shares the embedding and output head with the main model and owns enorm, hnorm, eh_proj,
one transformer block and shared_head.norm. On a sequence of T tokens it runs over the first T - k positions:

    h'_i = eh_proj([enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])      embedding first, as in the released weights
    h^k  = TRM_k(h')                                              causal, RoPE at the original positions i
    logits^k_i = Head(shared_head.norm(h^k_i))                    predicts t_{i+k+1}

h^0 is the main model's final-norm output (what engines running the released weights feed); for k > 1,
h^{k-1} is module k-1's output after its shared_head.norm (vLLM's recycling). The loss of depth k is the
cross-entropy against the labels shifted by k more: L_MTP = (lambda / D) sum_k L^k, lambda set by training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.block import Block


class MTP(Block):
    """One MTP depth: a Block (same structure as a main layer at index L + k - 1) plus its projections."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(H, cfg.rms_norm_eps)})

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, cache=None, balance_loss=True):
        """h_prev, emb_next (b, s, H) -> normed hidden (b, s, H) for the shared head, router stats."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        x, stats = super().forward(x, cos, sin, cache, balance_loss)
        return self.shared_head["norm"](x), stats


def mtp_targets(labels: torch.Tensor, k: int) -> torch.Tensor:
    """labels (b, s) are the main targets (labels[:, i] = t_{i+1}); depth k at position i predicts
    t_{i+k+1} = labels[:, i + k], for the s - k positions it runs on."""
    return labels[:, k:]


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, ignore_index: int = -100) -> list[torch.Tensor]:
    """Per-depth cross-entropy of depth-k logits (b, s - k, V) against `mtp_targets(labels, k)`."""
    return [F.cross_entropy(logits.flatten(0, 1).float(), mtp_targets(labels, k).flatten(), ignore_index=ignore_index)
            for k, logits in enumerate(mtp_logits, start=1)]
