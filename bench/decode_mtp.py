"""MTP speculative decoding for bench/decode.py: plain vs speculative greedy decoding on one engine, interleaved,
with an acceptance sweep (`Spoiler`) on a trained checkpoint; the speed-up at each acceptance and whether the
output stayed identical.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


def spec_timed(model, prompts: list[list[int]], batch: int, speculative: bool, max_tokens: int, tok=None) -> dict:
    """Greedy completions, `batch` requests at a time; decode = the steps after each batch's prefill step."""
    engine = Engine(model, tok, max_batch=batch, speculative=speculative,
                    max_len=max(len(p) for p in prompts) + max_tokens + 2, prefill_tokens=1 << 30)
    outs, decode_s, total_s, decode_tokens = [], 0.0, 0.0, 0
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        reqs = [engine.add(p, SamplingParams(max_tokens=max_tokens)) for p in prompts[i:i + batch]]
        engine.step()
        t1 = time.perf_counter()
        engine.run()
        t2 = time.perf_counter()
        decode_s += t2 - t1
        total_s += t2 - t0
        decode_tokens += sum(len(r.tokens) - 1 for r in reqs)
        outs += [r.tokens for r in reqs]
    n_tokens = sum(len(o) for o in outs)
    return dict(decode_tok_s=decode_tokens / decode_s, e2e_tok_s=n_tokens / total_s, tokens=outs,
                acceptance=engine.acceptance_rate if speculative else None, steps=engine.stats["steps"],
                drafted=engine.stats["drafted"], accepted=engine.stats["accepted"], n_tokens=n_tokens)


class Spoiler:
    """Lowers the MTP acceptance on purpose, for the acceptance sweep: with probability p a row's draft becomes the
    MTP module's second choice (rejected unless the main model prefers it). Greedy output is unchanged
    (verification is exact); the extra ops (~20 us per step) count against speculation."""

    def __init__(self, draft, p: float, seed: int = 0):
        self.draft, self.p, self.g = draft, p, torch.Generator().manual_seed(seed)

    def __call__(self, *args, **kwargs):
        logits = self.draft(*args, **kwargs)  # (b, k, V)
        hit = torch.rand(logits.shape[:2], generator=self.g) < self.p
        second = logits.scatter(-1, logits.argmax(-1, keepdim=True), float("-inf"))
        return torch.where(hit[..., None], second, logits)


def spec_compare(model, prompts, batch, reps, max_tokens, tok=None, spoil=(0.0,)) -> list[dict]:
    """Plain vs speculative greedy decoding, interleaved; one row per spoil probability (Spoiler)."""
    runs = {None: [], **{p: [] for p in spoil}}
    spec_timed(model, prompts[:batch], batch, False, 4, tok)  # warm-up
    spec_timed(model, prompts[:batch], batch, True, 4, tok)
    for _ in range(reps):
        for p in runs:
            if p:
                model.draft = Spoiler(model.draft, p)  # an instance attribute over the method
            try:
                runs[p].append(spec_timed(model, prompts, batch, p is not None, max_tokens, tok))
            finally:
                model.__dict__.pop("draft", None)
    base = runs.pop(None)
    d0, e0 = statistics.median([r["decode_tok_s"] for r in base]), statistics.median([r["e2e_tok_s"] for r in base])
    out = []
    for p, spec in runs.items():
        d1, e1 = statistics.median([r["decode_tok_s"] for r in spec]), statistics.median([r["e2e_tok_s"] for r in spec])
        out.append(dict(batch=batch, requests=len(prompts), reps=reps, tokens=base[0]["n_tokens"], spoil=p,
                        decode_tok_s=d0, decode_tok_s_spec=d1, speedup=d1 / d0, e2e_tok_s=e0, e2e_tok_s_spec=e1,
                        e2e_speedup=e1 / e0, acceptance=spec[0]["acceptance"],
                        steps=base[0]["steps"], steps_spec=spec[0]["steps"],
                        identical=all(r["tokens"] == base[0]["tokens"] for r in base + spec)))
    return out


def mtp_section(checkpoint: str, quick: bool, log, guard) -> dict | None:
    if not Path(checkpoint).is_dir():
        log(f"MTP speculative decoding: skipped ({checkpoint} does not exist; train one with `make demo`)")
        return None
    from nanoseek.data.builtin import heldout
    from nanoseek.hf import load_pretrained

    pre = load_pretrained(checkpoint)
    model, tok = pre.model, pre.tokenizer
    if not model.mtp:
        log(f"MTP speculative decoding: skipped ({checkpoint} has no MTP module)")
        return None
    n1, n16 = (4, 16) if quick else (8, 16)
    problems = heldout(max(n1, n16))
    prompts = [tok.apply_chat([{"role": "user", "content": p.prompt}]) for p in problems]
    reps = 1 if quick else 3
    # the acceptance sweep: drafts spoiled with probability 1 - a / a0 bring the acceptance a0 down to ~a
    a0 = spec_compare(model, prompts[:n1], 1, 1, 32, tok)[0]["acceptance"]
    spoil = (0.0, *(max(0.0, 1 - a / a0) for a in (0.8, 0.7, 0.65, 0.6) if a < a0))
    return dict(checkpoint=str(checkpoint), preset=model.config.summary() if hasattr(model.config, "summary") else "",
                bs1=guard("mtp b1", lambda: spec_compare(model, prompts[:n1], 1, reps, 96, tok, spoil)),
                bs16=guard("mtp b16", lambda: spec_compare(model, prompts[:n16], 16, reps, 96, tok, spoil[:1] + spoil[1:][-1:])))


def log_spec_table(mtp: dict | None, small_spec: dict | None, log) -> None:
    """The speculative rows (trained checkpoint, its acceptance sweep, small random init) as one table."""
    log("\n## MTP speculative decoding (greedy)\n")
    log("| model | drafts spoiled | batch | requests | tokens | acceptance | decode tok/s | spec tok/s | speed-up | "
        "e2e speed-up | steps | spec steps | identical |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    spec_rows = []
    if mtp:
        spec_rows += [("runs/nano (trained)", s) for key in ("bs1", "bs16") for s in mtp[key]]
    if small_spec:
        spec_rows.append(("small random init", small_spec))
    for name, s in spec_rows:
        log(f"| {name} | {s.get('spoil') or 0:.0%} | {s['batch']} | {s['requests']} | {s['tokens']} | "
            f"{s['acceptance']:.2f} | {s['decode_tok_s']:.0f} | {s['decode_tok_s_spec']:.0f} | {s['speedup']:.2f}x | "
            f"{s['e2e_speedup']:.2f}x | {s['steps']} | {s['steps_spec']} | {s['identical']} |")
    if mtp:
        log("(drafts spoiled: the acceptance sweep, `Spoiler`: that share of drafts replaced by the MTP module's "
            "second choice; the output stays identical)")
    if small_spec:
        log("(small random init: the MTP module is untrained, so drafts are almost never accepted; the row shows the"
            " cost of a rejected draft)")
