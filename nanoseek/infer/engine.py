"""Batched generation on the MLA latent cache.

Prompts of different lengths are right-padded and prefilled together (each row has its own positions;
a row's padding slots are overwritten by its own generated tokens before any query can see them), then
every step feeds one token per row through the absorbed attention path.

Sampling: temperature 0 is greedy; otherwise logits / T, then top-k, then top-p (nucleus), drawn from a
torch.Generator seeded per call so the same seed gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model import Transformer


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (b, V) -> token ids (b,)."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams,
             stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Complete each prompt; a row stops at a stop id (included in its output) or after max_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    b, lens = len(prompts), [len(p) for p in prompts]
    total = max(lens) + params.max_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({max(lens)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                         f"of {model.config.max_position_embeddings} tokens")
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    cache = model.new_cache(b, total)
    ids = torch.zeros(b, max(lens), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(max(lens), device=device).expand(b, -1)
    logits = model(ids, positions, cache, mtp=False).logits
    pos = torch.tensor(lens, device=device)
    logits = logits[torch.arange(b, device=device), pos - 1]
    out: list[list[int]] = [[] for _ in range(b)]
    active = [True] * b
    stops = set(stop_ids)
    for step in range(params.max_tokens):
        nxt = sample(logits, params, generator)
        for r, t in enumerate(nxt.tolist()):
            if active[r]:
                out[r].append(t)
                active[r] = t not in stops
        if not any(active) or step == params.max_tokens - 1:
            break
        logits = model(nxt[:, None], pos[:, None], cache, mtp=False).logits[:, 0]
        pos = pos + 1
    return out
