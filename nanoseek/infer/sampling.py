"""Sampling: per-request parameters, next-token distributions for a batch of rows, and the speculative
acceptance rule.

Each row of a batch has its own SamplingParams. A temperature below TEMPERATURE_FLOOR is greedy and its
distribution is the one-hot of the argmax; otherwise (logits - max) / T, then top-k, then top-p (the smallest
prefix of the sorted tokens whose mass reaches p), renormalized. Draws use the request's own torch.Generator,
so a seeded request gives the same text whatever else shares its batch.

Extreme inputs cannot make NaN: `guard` maps NaN logits to -inf and +inf to the largest float before any of
this, so the row maximum is finite and its probability exp(0) = 1 keeps every normalizer >= 1; a row with no
finite logit at all is reported as bad (its request ends with an error) and never reaches a draw.
Log-probs (`logprobs`) are the model's own, log_softmax of the raw logits, whatever the sampling settings.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft token d ~ q is accepted with
probability min(1, p(d) / q(d)); on rejection the token is drawn from norm(max(p - q, 0)). The emitted token
is then distributed exactly as p. With one-hot p and q (greedy) this is "accept iff d = argmax p, else take
argmax p", so greedy speculative decoding gives the same tokens as plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this temperature sampling is greedy (as vLLM's 1e-5): logits / T overflows for tiny T and the
# distribution is the argmax's one-hot to float precision anyway.
TEMPERATURE_FLOOR = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()  # stop strings (need the engine's tokenizer); not part of the returned text
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides the tokenizer's end-of-text
    logprobs: int | None = None  # log-prob of each generated token and of its `logprobs` top alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token after the first

    def __post_init__(self):
        checks = [("max_tokens", self.max_tokens >= 1, ">= 1"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("logprobs", self.logprobs is None or self.logprobs >= 0, ">= 0 (or None)"),
                  ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, ">= 0 (or None)")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)} must be {rule}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR

    def generator(self, device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else int(torch.randint(2**62, (1,))))
        return g


def guard(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V) -> (float32 logits with NaN as -inf and +inf as the largest float, bad (...) bool: rows
    without a single finite logit, which no sampling can use)."""
    logits = logits.float()
    if bool(torch.isfinite(logits).all()):  # the common case: one check, no copy
        return logits, torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                               neginf=float("-inf"))
    return logits, ~(logits > float("-inf")).any(dim=-1)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
             ) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """The model's log-probabilities: logits (n, V) and the tokens chosen (n,) -> (log p(token) per row, the
    `top` most likely ids per row, their log-probs), from log_softmax of the raw logits (no temperature)."""
    lp = guard(logits)[0].log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None].to(lp.device))[:, 0].tolist()
    if top <= 0:
        return chosen, [[] for _ in chosen], [[] for _ in chosen]
    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
    return chosen, ids.tolist(), values.tolist()


def requested_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int | None]
                       ) -> list[tuple[float, list[int], list[float]] | None]:
    """`logprobs` for the rows that ask (tops[i] alternatives; None: the row wants none), in one pass."""
    want = [i for i, k in enumerate(tops) if k is not None]
    out: list = [None] * len(tops)
    if want:
        idx = torch.tensor(want, device=logits.device)
        for i, lp, ids, vals in zip(want, *logprobs(logits[idx], tokens[idx], max(tops[i] for i in want))):
            out[i] = (lp, ids[:tops[i]], vals[:tops[i]])
    return out


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits (b, V) -> probabilities (b, V) after each row's temperature, top-k and top-p; one-hot for greedy.
    Call on `guard`ed logits: each row's maximum is then finite, so the softmax's normalizer is >= 1."""
    logits = logits.float()
    probs = torch.zeros_like(logits)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        probs[idx] = probs[idx].scatter(1, logits[idx].argmax(-1, keepdim=True), 1.0)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        temp = torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
        chosen = logits[idx]
        sorted_logits, order = ((chosen - chosen.amax(-1, keepdim=True)) / temp).sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        top_k = torch.tensor([min(params[i].top_k or logits.shape[-1], logits.shape[-1]) for i in rows],
                             device=logits.device)[:, None]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        top_p = torch.tensor([params[i].top_p if params[i].top_p < 1 else 2.0 for i in rows],
                             device=logits.device)[:, None]
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already reaches p
        drop[:, 0] = False  # the most likely token always stays (a p that rounds to 0 in float32 keeps it alone)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        probs[idx] = torch.zeros_like(sorted_probs).scatter(1, order, sorted_probs)
    return probs


def draw(probs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
         ) -> torch.Tensor:
    """One token per row (b,): the argmax for greedy rows; for the others inverse-CDF sampling with one uniform
    u from the row's generator, the first token whose cumulative probability (fp64) exceeds u times the row's
    total (a token of probability 0 is never drawn). All rows at once: one uniform per row is the only per-row
    work."""
    out = probs.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=probs.device)
        u = torch.stack([torch.rand((), generator=generators[i], device=probs.device, dtype=torch.float64)
                         for i in rows])
        cdf = probs[idx].double().cumsum(dim=-1)
        token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        out[idx] = token.clamp_max(probs.shape[-1] - 1)
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> torch.Tensor:
    """logits (b, V) -> token ids (b,)."""
    return propose(logits, params, generators)[0]


def propose(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens (b,) drawn from logits (b, V) and their distributions q (b, V); q is None when every row is
    greedy (each q is then the one-hot of its token, never built)."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1), None
    q = distributions(logits, params)
    return draw(q, params, generators), q


def verify(logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept` on the target's logits (b, V). q None (every row greedy, one-hot drafts from `propose`): the
    draft is accepted iff it is the argmax, and the token is the argmax."""
    if q is None:
        token = logits.argmax(dim=-1)
        return token == draft, token
    return accept(distributions(logits, params), q, draft, params, generators)


def accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance per row. p, q (b, V): target and draft distributions; draft (b,) drawn from q.
    Returns (accepted (b,) bool, token (b,)): the draft where accepted, else a draw from norm(max(p - q, 0))."""
    rows = torch.arange(p.shape[0], device=p.device)
    ratio = p[rows, draft] / q[rows, draft].clamp_min(1e-20)
    u = torch.stack([torch.zeros((), device=p.device) if prm.greedy else torch.rand((), generator=g, device=p.device)
                     for prm, g in zip(params, generators)])
    accepted = u < ratio  # greedy rows: ratio is 1 (draft = argmax p) or 0
    token = draft.clone()
    for i in (~accepted).nonzero()[:, 0].tolist():
        residual = (p[i] - q[i]).clamp_min(0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]  # p == q: a draw from p is exact
        token[i] = draw(residual[None], params[i:i + 1], generators[i:i + 1])[0]
    return accepted, token
