"""The engine's entry to the fast path: the model's forward and MTP draft, through the decoding plan where it
applies (a cached step of up to `absorb_max_query` new tokens per row, without autograd, plain layers) and
through the model itself everywhere else (prefill, training, FP8 or expert-parallel layers)."""

from __future__ import annotations

import torch

from nanoseek.infer.fastpath.ops import rope_matrices
from nanoseek.infer.fastpath.plan import Plan, plan_for
from nanoseek.model import Transformer
from nanoseek.model.mla import LatentCache
from nanoseek.model.transformer import ModelOutput, gather_positions


class Decoder:
    """Call it as the model (`decoder(ids, positions, cache, mtp=False, logits_at=...)`, `decoder.draft(...)`);
    the same outputs, from the plan when it applies (tests/infer/fastpath/test_plan.py)."""

    def __init__(self, model: Transformer):
        self.model = model
        self._rot: tuple | None = None  # (positions, their version, RoPE matrices): the step's, reused by the draft

    def _plan(self, s: int, cache: LatentCache) -> Plan | None:
        if cache.fresh or s > self.model.layers[0].self_attn.absorb_max_query or torch.is_grad_enabled():
            return None
        return plan_for(self.model)

    def _rotations(self, cache: LatentCache) -> torch.Tensor:
        """The rows' RoPE matrices (b s, d_r, d_r) at the step's positions (`cache.begin`), built once per step."""
        pos = cache.positions
        if self._rot is None or self._rot[0] is not pos or self._rot[1] != pos._version:
            cos, sin = self.model.rope_cos_sin(pos.reshape(-1))
            self._rot = (pos, pos._version, rope_matrices(cos, sin, self.model.config.rope_interleave))
        return self._rot[2]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache, mtp: bool = False,
                 logits_at: torch.Tensor | None = None) -> ModelOutput:
        """Transformer.forward with a cache (no labels)."""
        cache.begin(positions)
        plan = self._plan(input_ids.shape[1], cache)
        if plan is None:
            return self.model(input_ids, positions, cache, mtp=mtp, logits_at=logits_at)
        self.model.check_input_ids(input_ids)
        b, s = input_ids.shape
        h = plan.forward(input_ids, self._rotations(cache), cache)
        at = h if logits_at is None else gather_positions(h.view(b, s, -1), logits_at).flatten(0, 1)
        return ModelOutput(logits=plan.logits(at).view(b, -1, self.model.config.vocab_size), hidden=h.view(b, s, -1))

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
              logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer.draft; through the plan, the MTP layer's output is computed at logits_at only (every row
        still writes its latent)."""
        cache.begin(positions)
        plan = self._plan(positions.shape[1], cache) if self.model.mtp else None
        if plan is None:
            return self.model.draft(hidden, next_ids, positions, cache, logits_at)
        b, s, H = hidden.shape
        keep = None if logits_at is None else (torch.arange(b, device=hidden.device)[:, None] * s
                                                + logits_at).flatten()
        h = plan.draft(hidden.reshape(-1, H), self.model.embed_tokens(next_ids).view(-1, H), self._rotations(cache),
                       cache, keep)
        return plan.logits(h).view(b, -1, self.model.config.vocab_size)
