"""Where one nanoseek decode step goes: timers around the decoding plan's parts (infer/fastpath/), the cache,
the router, the products and sampling, and with `op_table` torch.profiler's op table (used by
`bench/decode.py --profile`, or alone: `python bench/decode_profile.py [--batch 16] [--ops]`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.infer import engine as engine_mod
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


def profile_decode(cfg, ours, steps: int, op_table: bool, log, batch: int = 1, P: int = 128) -> dict:
    """Where one decode step (b=batch, prompt P) goes: timers around the decoding plan's parts (infer/fastpath/),
    the cache, the router, the products and sampling (each timer costs ~1 us; CPU ops are synchronous)."""
    from nanoseek.infer.fastpath import Decoder
    from nanoseek.infer.fastpath import plan as decode
    from nanoseek.model.mla import LatentCache
    from nanoseek.model.moe import Gate

    acc = collections.defaultdict(float)
    patches = []
    depth = collections.Counter()

    def timed(key, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):  # only the outermost call of a key counts (one wrapped method may call another)
            name = key(a) if callable(key) else key
            depth[name] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[name] -= 1
                if not depth[name]:
                    acc[name] += time.perf_counter() - t0
        return wrapper

    def patch(owner, name, key):
        orig = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, timed(key, orig))
        patches.append((owner, name, orig))

    for owner, name, key in [
            (Decoder, "__call__", "forward"), (decode._Block, "attention", "attention"),
            (decode, "absorbed", "attention: absorbed core"), (LatentCache, "update", "attention: cache write"),
            (LatentCache, "begin", "cache.begin (mask)"), (decode._MoE, "__call__", "moe"),
            (decode._MLP, "__call__", lambda a: "moe: shared expert" if depth["moe"] else "dense FFN (layer 0)"),
            (Gate, "route", "moe: router"), (decode, "experts_few", "moe: grouped experts (> 4 tokens)"),
            (decode, "rms_norm", "norms"), (decode, "mul_wt", "products (GEMVs) in the layers"),
            (decode, "rotate", "attention: RoPE"), (decode.Plan, "logits", "lm_head"),
            (engine_mod, "sample", "sampling")]:
        patch(owner, name, key)
    decode._PLANS.pop(ours, None)  # the plan binds Gate.route when it is built: rebuild it with the timer
    try:
        engine = Engine(ours, max_batch=batch, max_len=P + steps + 16, prefill_tokens=batch * P)
        prompts = torch.randint(0, cfg.vocab_size, (batch, P), generator=torch.Generator().manual_seed(4)).tolist()
        for prompt in prompts:
            engine.add(prompt, SamplingParams(max_tokens=steps + 8))
        for _ in range(6):  # prefill + warm-up decode steps
            engine.step()
        acc.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - t0) / steps
        per = {k: v / steps * 1e3 for k, v in acc.items()}
    finally:
        for owner, name, orig in patches:
            setattr(owner, name, orig)
        decode._PLANS.pop(ours, None)
    step_ms = step_s * 1e3
    fwd, attn, moe = per.get("forward", 0), per.get("attention", 0), per.get("moe", 0)
    parts = collections.OrderedDict()
    parts["attention: projections, norms, residual"] = attn - sum(per.get(k, 0) for k in (
        "attention: absorbed core", "attention: cache write", "attention: RoPE"))
    for k in ("attention: RoPE", "attention: cache write", "attention: absorbed core", "moe: router",
              "moe: shared expert", "moe: grouped experts (> 4 tokens)"):
        parts[k] = per.get(k, 0)
    parts["moe: router GEMV, direct experts, combine"] = moe - sum(per.get(k, 0) for k in (
        "moe: router", "moe: shared expert", "moe: grouped experts (> 4 tokens)"))
    parts["dense FFN (layer 0)"] = per.get("dense FFN (layer 0)", 0)
    parts["lm_head"] = per.get("lm_head", 0)
    parts["cache.begin (mask)"] = per.get("cache.begin (mask)", 0)
    parts["forward: rest (checks, RoPE matrices, embedding, norms between)"] = fwd - sum(
        per.get(k, 0) for k in ("attention", "moe", "dense FFN (layer 0)", "lm_head", "cache.begin (mask)"))
    parts["sampling"] = per.get("sampling", 0)
    parts["engine: rest (ids/pos tensors, emit, retire)"] = step_ms - fwd - per.get("sampling", 0)
    parts["(of the above: products in the layers, mul_wt)"] = per.get("products (GEMVs) in the layers", 0)
    parts["(of the above: RMSNorm calls)"] = per.get("norms", 0)
    log(f"\nWhere a nanoseek decode step goes (b={batch}, P={P}, {steps} steps, {step_ms:.2f} ms/step with timers):")
    log(f"| {'part':<52} | {'ms/step':>8} | {'share':>6} |")
    log(f"|{'-' * 54}|{'-' * 10}|{'-' * 8}|")
    for k, v in parts.items():
        log(f"| {k:<52} | {v:>8.2f} | {v / step_ms:>6.1%} |")
    result = dict(step_ms=step_ms, parts=dict(parts))
    if op_table:
        from torch.profiler import ProfilerActivity, profile

        engine = Engine(ours, max_batch=batch, max_len=P + steps + 16, prefill_tokens=batch * P)
        for prompt in prompts:
            engine.add(prompt, SamplingParams(max_tokens=steps + 8))
        for _ in range(6):
            engine.step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                engine.step()
        log(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                               max_name_column_width=28,
                                                               max_shapes_column_width=60))
        events = prof.key_averages()
        result["aten_calls_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ops", action="store_true", help="torch.profiler's op table too")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    ours = Transformer(cfg).eval()
    profile_decode(cfg, ours, args.steps, args.ops, print, batch=args.batch, P=args.prompt)


if __name__ == "__main__":
    main()
