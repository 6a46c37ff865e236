"""Generation on the MLA latent cache: continuous batching, per-request sampling, MTP speculative decoding.

The engine owns one LatentCache of `max_batch` rows x `max_len` positions (c + r numbers per token per layer,
nothing else). Running requests hold rows 0..n-1, packed: when one finishes, the last row's cache moves
into its slot, so every forward works on the view cache[:n] without gathers. Each `step()`:

1. decode: every running row feeds its newest token at its own position through the weight-absorbed
   attention path (memory-bound: MQA over the latent cache) and samples the next one.
2. admit: waiting requests join while rows are free (up to `prefill_tokens` prompt tokens per step), prefilled
   together, right-padded, on the compute-bound path (causal SDPA over expanded K/V, as in training); only the
   last prompt position's logits are computed, and the first token is sampled from them.
3. finished requests (stop id, stop string, max_tokens, cancelled) leave; their rows are reused.

MTP speculative decoding (DeepSeek-V3 report §2.2: the MTP module "can be repurposed for speculative decoding"):
the MTP module drafts d for position p + 1 from the main model's hidden state at p - 1 and the token at p.
A decode step then feeds [x_p, d] at [p, p + 1] (one forward, two tokens per row); d is accepted by the rule
in sampling.accept (greedy: d equals the argmax), and when it is, the main model's prediction at p + 1 comes
free: two tokens for one forward. The MTP module then runs on the same two positions (its own cache layer)
to draft the next token. A rejected draft's cache slots are overwritten before anything reads them.
Only depth 1 drafts (V3 trains one MTP module); `stats` counts drafts and acceptances.

Failures stay with their request. A row whose logits hold no finite value ends with finish_reason "error"
(sampling.guard); a phase that raises (prefill or decode) is run again one row at a time, so only the rows
that fail alone end with "error" and the others go on (a retried row rewrites the same cache slots).
Log-probs (SamplingParams.logprobs / prompt_logprobs) are log_softmax of the model's raw logits: the
prompt's come from the prefill's hidden states through the head, in chunks of positions.
"""

from __future__ import annotations

import itertools
import logging
import queue
from collections import deque
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from nanoseek import kernels
from nanoseek.infer.fastpath import Decoder
from nanoseek.infer.sampling import SamplingParams, guard, logprobs, propose, requested_logprobs, sample, verify
from nanoseek.infer.text import TextStream
from nanoseek.model import Transformer

log = logging.getLogger(__name__)
# A token's log-probs: (log p(token), the top ids, their log-probs); the prompt's first token has None.
Logprob = tuple[float, list[int], list[float]]
HEAD_CHUNK = 1 << 24  # logits computed at once for prompt log-probs (positions x vocabulary)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # generated ids; a stop id that ended it is included
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # why it ended with "error"
    cancelled: bool = False  # may be set from any thread; the engine drops the request at its next step
    stream: TextStream | None = None  # the text so far, with the engine's tokenizer
    stop_ids: frozenset[int] = frozenset()
    pos: int = 0  # position of `last`, the newest token, not yet fed to the model
    last: int = 0
    draft: int = 0  # speculative: MTP's draft for position pos + 1, drawn from draft_q
    draft_q: torch.Tensor | None = None
    generator: torch.Generator | None = None
    logprobs: list[Logprob] = field(default_factory=list)  # per generated token, with params.logprobs
    prompt_logprobs: list[Logprob | None] | None = None  # per prompt token, with params.prompt_logprobs

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream else ""


@dataclass
class Update:
    """What one step did for one request: new token ids, their log-probs (with params.logprobs), the text
    they completed, whether it finished."""
    request: Request
    tokens: list[int]
    text: str
    logprobs: list[Logprob] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.request.done


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 speculative: bool = False, prefill_tokens: int = 4096):
        cfg = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if speculative and not model.mtp:
            raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        kernels.apply(model, kernels.Settings.decoding())  # prefill's attention through SDPA's CPU flash kernel
        self.model = model.eval()
        self.forward = Decoder(self.model)  # the model, through the decoding plan where it applies (fastpath/)
        self.tokenizer = tokenizer
        self.max_batch, self.speculative, self.prefill_tokens = max_batch, speculative, prefill_tokens
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.device = model.embed_tokens.weight.device
        self.cache = model.new_cache(max_batch, self.max_len)
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()  # add() may be called from any thread
        self.waiting: deque[Request] = deque()  # touched by the stepping thread only
        self.running: list[Request] = []  # running[i] holds cache row i
        self.eos = tokenizer.stop_ids if tokenizer is not None else frozenset()
        self.stats = dict(steps=0, prefill_tokens=0, tokens=0, drafted=0, accepted=0)
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], params: SamplingParams = SamplingParams(), stream: bool = True) -> Request:
        """Queue a request (thread-safe); it joins the batch at the next step. stream=False: its text is decoded
        once when it finishes (Update.text stays empty until then; stop strings still end it on time)."""
        V = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token")
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"prompt token {prompt[bad]} at index {bad} is outside the vocabulary [0, {V})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        req = Request(list(prompt), params, id=next(self._ids), stop_ids=self.eos | set(params.stop_token_ids),
                      generator=params.generator(self.device))
        if self.tokenizer is not None:
            req.stream = TextStream(self.tokenizer, params.stop, skip_ids=req.stop_ids, lazy=not stream)
        self.inbox.put(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or not self.inbox.empty())

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(self.stats["drafted"], 1)

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.has_work():
            self.step()

    @torch.no_grad()
    def step(self) -> list[Update]:
        updates = self._drop_cancelled()
        if self.running:
            updates += self._decode_rows()
            self._retire()
        updates += self._admit()  # new rows get their first token from the prefill
        self._retire()
        self.stats["steps"] += 1
        return updates

    # ------------------------------------------------------------------ the three phases
    def _admit(self) -> list[Update]:
        """Prefill the waiting requests that fit; when the batch's prefill raises, each one alone."""
        new: list[Request] = []
        budget = self.prefill_tokens
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            if new and len(req.prompt) > budget:
                break
            budget -= len(req.prompt)
            new.append(self.waiting.popleft())
        if not new:
            return []
        try:
            return self._prefill(new)
        except Exception as e:  # noqa: BLE001 (any failure: isolate the request that causes it)
            if len(new) == 1:
                return [self._fail(new[0], e)]
            log.warning("prefill of %d requests failed (%r); retrying them one at a time", len(new), e)
            updates = []
            for r in new:
                try:
                    updates += self._prefill([r])
                except Exception as e1:  # noqa: BLE001
                    updates.append(self._fail(r, e1))
            return updates

    def _prefill(self, new: list[Request]) -> list[Update]:
        """Prefill `new` into rows len(running)..; they join `running` once everything they need is computed."""
        n0, k, S = len(self.running), len(new), max(len(r.prompt) for r in new)
        ids = torch.zeros(k, S, dtype=torch.long, device=self.device)
        for i, r in enumerate(new):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt, device=self.device)
        lens = torch.tensor([len(r.prompt) for r in new], device=self.device)
        positions = torch.arange(S, device=self.device).expand(k, S)
        cache = self.cache.view(slice(n0, n0 + k))
        out = self.forward(ids, positions, cache, mtp=False, logits_at=(lens - 1)[:, None])
        params, gens = [r.params for r in new], [r.generator for r in new]
        logits = self._checked(out.logits[:, 0], new)
        first = sample(logits, params, gens)
        lps = self._logprobs(logits, first, new)
        prompt_lps = [self._prompt_logprobs(out.hidden[i], r) if r.params.prompt_logprobs is not None else None
                      for i, r in enumerate(new)]
        if self.speculative:  # MTP over the prompt: position i sees token i + 1 (the first new one at the end)
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            nxt[torch.arange(k), lens - 1] = first
            draft = self.forward.draft(out.hidden, nxt, positions, cache, (lens - 1)[:, None])[:, 0]
            drafts, q = propose(guard(draft)[0], params, gens)
        self.running.extend(new)
        self.stats["prefill_tokens"] += int(lens.sum())
        updates = []
        firsts, ds = first.tolist(), drafts.tolist() if self.speculative else None
        for i, r in enumerate(new):
            r.pos, r.last, r.prompt_logprobs = len(r.prompt), firsts[i], prompt_lps[i]
            if self.speculative:
                r.draft, r.draft_q = ds[i], None if q is None else q[i]
            updates.append(self._emit(r, [r.last], lps[i:i + 1]))
        return updates

    def _decode_rows(self) -> list[Update]:
        """One decode step of every running row; when it raises, each row alone (the failing ones end)."""
        decode = self._decode_speculative if self.speculative else self._decode
        n = len(self.running)
        try:
            return decode(slice(0, n))
        except Exception as e:  # noqa: BLE001
            if n == 1:
                return [self._fail(self.running[0], e)]
            log.warning("decode step of %d rows failed (%r); retrying them one at a time", n, e)
            updates = []
            for i in range(n):
                try:
                    updates += decode(slice(i, i + 1))
                except Exception as e1:  # noqa: BLE001
                    updates.append(self._fail(self.running[i], e1))
            return updates

    def _decode(self, at: slice) -> list[Update]:
        rows = self.running[at]
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)
        logits = self._checked(self.forward(ids, pos, self.cache.view(at), mtp=False).logits[:, 0], rows)
        toks = sample(logits, [r.params for r in rows], [r.generator for r in rows])
        lps = self._logprobs(logits, toks, rows)
        updates = []
        for i, (r, t) in enumerate(zip(rows, toks.tolist())):
            r.pos, r.last = r.pos + 1, t
            updates.append(self._emit(r, [t], lps[i:i + 1]))
        return updates

    def _decode_speculative(self, at: slice) -> list[Update]:
        rows = self.running[at]
        n, params, gens = len(rows), [r.params for r in rows], [r.generator for r in rows]
        ids = torch.tensor([[r.last, r.draft] for r in rows], device=self.device)
        pos = torch.tensor([[r.pos, r.pos + 1] for r in rows], device=self.device)
        cache = self.cache.view(at)
        out = self.forward(ids, pos, cache, mtp=False)  # verify: logits at p predict p + 1, at p + 1 predict p + 2
        l1, l2 = self._checked(out.logits[:, 0], rows), self._checked(out.logits[:, 1], rows)
        ok, t1 = verify(l1, ids[:, 1], self._draft_q(rows), params, gens)
        t2 = sample(l2, params, gens)
        nxt = torch.stack([t1, torch.where(ok, t2, t1)], dim=1)  # tokens at p + 1, p + 2 (the latter if accepted)
        draft = self.forward.draft(out.hidden, nxt, pos, cache, ok.long()[:, None])[:, 0]
        new_drafts, q = propose(guard(draft)[0], params, gens)
        lp1, lp2 = self._logprobs(l1, t1, rows), self._logprobs(l2, t2, rows)
        oks, t1s, t2s, ds = ok.tolist(), t1.tolist(), t2.tolist(), new_drafts.tolist()
        self.stats["drafted"] += n
        self.stats["accepted"] += sum(oks)
        updates = []
        for i, r in enumerate(rows):
            toks, lps = ([t1s[i], t2s[i]], lp1[i:i + 1] + lp2[i:i + 1]) if oks[i] else ([t1s[i]], lp1[i:i + 1])
            r.pos, r.last = r.pos + len(toks), toks[-1]
            r.draft, r.draft_q = ds[i], None if q is None else q[i]
            updates.append(self._emit(r, toks, lps))
        return updates

    def _draft_q(self, rows: list[Request]) -> torch.Tensor | None:
        """The rows' draft distributions (b, V); None when every row drafted greedily (one-hot q, never built;
        a sampled request always has its q)."""
        if all(r.draft_q is None for r in rows):
            return None
        V = self.model.config.vocab_size
        return torch.stack([r.draft_q if r.draft_q is not None else
                            F.one_hot(torch.tensor(r.draft, device=self.device), V).float() for r in rows])

    # ------------------------------------------------------------------ log-probs and failures
    def _checked(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """Guarded logits (sampling.guard); a row without a finite logit ends its request with "error" (its
        logits are replaced by zeros so that the batch's sampling goes on; the token drawn is discarded)."""
        logits, bad = guard(logits)
        if bool(bad.any()):
            for i in bad.nonzero()[:, 0].tolist():
                rows[i].finish_reason = "error"
                rows[i].error = "the model produced no finite logit (NaN or -inf everywhere)"
            logits = logits.masked_fill(bad[:, None], 0.0)
        return logits

    def _fail(self, r: Request, e: Exception) -> Update:
        log.error("request %d failed: %r", r.id, e, exc_info=e)
        r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
        return Update(r, [], "")

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[Request]) -> list[Logprob | None]:
        """Per row: (log p(token), top ids, top log-probs) when its request asks for log-probs, else None."""
        return requested_logprobs(logits, tokens, [r.params.logprobs for r in rows])

    def _prompt_logprobs(self, hidden: torch.Tensor, r: Request) -> list[Logprob | None]:
        """Log-probs of prompt tokens 1.. given the ones before, from the prefill's hidden states (S, H) through
        the head, HEAD_CHUNK // V positions at a time; the first token has none."""
        n, V = len(r.prompt), self.model.config.vocab_size
        out: list[Logprob | None] = [None]
        targets = torch.tensor(r.prompt[1:], device=self.device)
        step = max(1, HEAD_CHUNK // V)
        for a in range(0, n - 1, step):
            b = min(a + step, n - 1)
            logits = self.model.lm_head(hidden[a:b])
            out += list(zip(*logprobs(logits, targets[a:b], r.params.prompt_logprobs)))
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _emit(self, r: Request, toks: list[int], lps: list[Logprob | None]) -> Update:
        """Append tokens up to a stop id or max_tokens (none once the request has failed); update the text and
        stop strings."""
        if r.done:  # failed in this step (no finite logit): its token is discarded
            return Update(r, [], "")
        kept, kept_lps = [], []
        for t, lp in zip(toks, lps):
            kept.append(t)
            r.tokens.append(t)
            if lp is not None:
                kept_lps.append(lp)
                r.logprobs.append(lp)
            if t in r.stop_ids:
                r.finish_reason = "stop"
                break
            if len(r.tokens) >= r.params.max_tokens:
                r.finish_reason = "length"
                break
        self.stats["tokens"] += len(kept)
        text = ""
        if r.stream is not None:
            try:  # detokenizing is this request's own work: a failure there ends it alone (its row stays consistent)
                text = r.stream.push(kept)
                if r.stream.stopped:
                    r.finish_reason = "stop"
                elif r.done:
                    text += r.stream.finish()
            except Exception as e:  # noqa: BLE001
                return self._fail(r, e)
        return Update(r, kept, text, kept_lps)

    def abort_all(self) -> list[Request]:
        """Remove every queued and running request (e.g. after a failed step) and return them."""
        self._drain_inbox()
        aborted = [*self.waiting, *self.running]
        self.waiting.clear()
        self.running.clear()
        return aborted

    def _drain_inbox(self) -> None:
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get())

    def _drop_cancelled(self) -> list[Update]:
        self._drain_inbox()
        updates = []
        for r in [*self.waiting, *self.running]:
            if r.cancelled and not r.done:
                r.finish_reason = "cancelled"
                updates.append(Update(r, [], ""))
        self.waiting = deque(r for r in self.waiting if not r.done)
        self._retire()
        return updates

    def _retire(self) -> None:
        """Remove finished rows, moving the last row's cache into each freed slot."""
        for i in reversed(range(len(self.running))):
            if self.running[i].done:
                last = self.running.pop()
                if i < len(self.running):
                    self.cache.move(len(self.running), i, last.pos)
                    self.running[i] = last


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
             stop_ids: tuple[int, ...] = (), speculative: bool = False, max_batch: int | None = None
             ) -> list[list[int]]:
    """Complete each prompt (token ids in, token ids out); a row stops at a stop id (included in its
    output) or after max_tokens. The engine's batch holds all prompts at once unless max_batch is given."""
    if not prompts:
        return []
    engine = Engine(model, max_batch=max_batch or len(prompts), speculative=speculative,
                    max_len=max(len(p) for p in prompts) + params.max_tokens)
    params = replace(params, stop_token_ids=tuple(params.stop_token_ids) + tuple(stop_ids))
    requests = [engine.add(p, params) for p in prompts]
    engine.run()
    return [r.tokens for r in requests]
