"""Quality cost of weight-only quantization (nanoseek.quant) on trained models: fp32 vs bf16, int8, int4.

    .venv/bin/python bench/quant_quality.py                       # the demo's runs (runs/nano, runs/grpo)
    .venv/bin/python bench/quant_quality.py --run R --grpo G --n 200 --k 4 --tokens 256 --json out.json
    .venv/bin/python bench/quant_quality.py --quick --run R --grpo R   # smoke run (small n, k, tokens, batches)

Run it from the repository root (a run's relative data paths, as the demo writes them, are read from there).
Variants, each loaded with hf.load_pretrained on the CPU: fp32 (the reference), bf16, int8 and int4 in groups
of 32, 64 and 128 (quantize=Spec: the int variants run bf16 activations, load_pretrained's default for them).
Kept in high precision (nanoseek/quant's docstring, KEEP): embedding, RMSNorms, router, kv_b_proj, lm_head.
A group size that does not divide a layer's input dimension is reported as not applicable, with the error.

Method, the same inputs for every variant:
- perplexity (--run): exp of nanoseek.train.loop.evaluate (the mean of the batches' token-mean cross-entropy,
  as the training's val_loss) over the first --batches batches of the run's validation split (TokenLoader
  val_batches: windows at 0, L, 2L, ..., the run's batch_size and seq_len); and its ratio to fp32's.
- greedy agreement (--run): the first --prompts held-out problems, posed as `nanoseek eval` poses them
  (rl.evaluate.prompt_ids), greedy-decoded for --tokens new tokens with infer.engine.generate, which has no
  tokenizer and so no end-of-text stop: all --tokens positions are compared. agreement = the share of positions
  whose token equals fp32's; first divergence = the mean over prompts of the first differing position (--tokens
  when none differs). After a divergence the two continue from different prefixes, so agreement <= divergence.
- held-out accuracy (--grpo): rl.evaluate.evaluate on --n problems, greedy + --k samples each at T 0.6,
  top-p 0.95, one seed per sample: the GRPO run's own held-out draw (rl.loop.heldout_eval's: its tasks,
  difficulty, seed and max_completion_tokens) or, for a run without a GRPO config, load_problems' built-in
  held-out mix. Δpass@1 carries the paired standard error over problems (same problems and seeds as fp32).
- model bytes (--run): quant.nbytes, every tensor (packed weights, scales, the kept ones, MTP included).
Targets (the issue): int8 perplexity within 0.5% of fp32's, int4 g128 within 3%, and pass@1 of int8 and int4
g128 at most 2 points below fp32's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanoseek import quant
from nanoseek.data.loader import TokenLoader
from nanoseek.data.tasks import get_task
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import generate
from nanoseek.infer.sampling import SamplingParams
from nanoseek.rl.evaluate import evaluate, load_problems, mean_and_se, prompt_ids
from nanoseek.rl.grpo import GRPOConfig
from nanoseek.train import loop as pretrain
from nanoseek.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"),
            "int8": dict(quantize=quant.Spec(8)),
            **{f"int4-g{g}": dict(quantize=quant.Spec(4, g)) for g in (32, 64, 128)}}
PPL_TARGETS = {"int8": 1.005, "int4-g128": 1.03}  # perplexity / fp32's at most
PASS_TARGET = 0.02  # pass@1 at most this far below fp32's, for the variants of PPL_TARGETS
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def load(path: str, **kw):
    with contextlib.redirect_stderr(io.StringIO()):  # load_pretrained's memory line, once per load
        return load_pretrained(path, device="cpu", **kw)


def val_loader(run: str) -> TokenLoader:
    """The run's validation split, batch_size and seq_len as it trained with (train.loop.resolve_data)."""
    cfg = TrainConfig.from_dict(json.loads((Path(run) / "config.json").read_text()))
    at_root = lambda p: p if not p or Path(p).is_absolute() else str(ROOT / p)  # noqa: E731
    data = dataclasses.replace(cfg.data, path=at_root(cfg.data.path), builtin_dir=at_root(cfg.data.builtin_dir))
    cfg, shard_dir, _ = pretrain.resolve_data(dataclasses.replace(cfg, data=data))
    return TokenLoader(shard_dir, "val", cfg.batch_size, cfg.data.seq_len, seed=cfg.seed, loss_on=cfg.data.loss_on)


def heldout(grpo: str, n: int) -> tuple[list, int | None, int]:
    """(problems, max_tokens or None, seed): the GRPO run's held-out draw (as rl.loop.heldout_eval draws it, n in
    all), else the built-in held-out mix."""
    d = json.loads((Path(grpo) / "config.json").read_text()).get("grpo")
    if d is None:
        return load_problems([], n, seed=0)[0], None, 0
    cfg = GRPOConfig(**{k: v for k, v in d.items() if k not in ("optim", "kernels")})
    per_task = max(n // len(cfg.task_names), 1)
    problems = [p for name in cfg.task_names for p in get_task(name, **cfg.task_options).sample(
        per_task, "heldout", seed=cfg.seed, difficulty=cfg.difficulty, unique=True)]
    return problems, cfg.max_completion_tokens, cfg.seed


def agreement(ref: list[list[int]], out: list[list[int]]) -> tuple[float, float]:
    """(share of positions with fp32's token, mean first differing position) over prompts."""
    same = [[a == b for a, b in zip(r, o)] for r, o in zip(ref, out)]
    first = [s.index(False) if False in s else len(s) for s in same]
    return sum(map(sum, same)) / sum(map(len, same)), sum(first) / len(first)


def measure(name: str, kw: dict, args, loader, prompts, problems, eval_opts, ref) -> dict:
    row = {"variant": name, **({"spec": dataclasses.asdict(kw["quantize"])} if "quantize" in kw else {})}
    log(f"{name}: loading {args.run}")
    try:
        pre = load(args.run, **kw)
    except ValueError as e:  # a group size that does not divide some layer's input dimension
        if "quantize" not in kw:
            raise
        log(f"{name}: not applicable: {e}")
        return row | {"applicable": False, "error": str(e)}
    model = pre.model
    row |= {"applicable": True, "bytes": quant.nbytes(model), "dtype": str(model.embed_tokens.weight.dtype)[6:]}
    if "quantize" in kw:
        kept = {n.rpartition(".")[0].rpartition(".")[2] or n for n, _ in model.named_parameters()}
        row["kept"] = sorted(kept)  # modules whose weights stay in high precision (nn.Parameters)
    loss = pretrain.evaluate(model, loader, args.batches, torch.device("cpu"), nullcontext())
    row |= {"val_loss": loss, "ppl": math.exp(loss)}
    log(f"{name}: perplexity {row['ppl']:.4f}; greedy decoding {len(prompts)} x {args.tokens} tokens")
    out = generate(model.eval(), prompts, SamplingParams(max_tokens=args.tokens))  # no tokenizer: no EOS stop
    row["greedy_tokens"] = out
    if ref is not None:
        row["agreement"], row["first_divergence"] = agreement(ref["greedy_tokens"], out)
    if args.grpo != args.run:
        del model, pre
        gc.collect()
        log(f"{name}: loading {args.grpo}")
        pre = load(args.grpo, **kw)
    log(f"{name}: held-out eval, {len(problems)} problems x (1 greedy + {args.k} samples)")
    ev = evaluate(pre.model, pre.tokenizer, problems, k=args.k, batch_size=256, progress=False, **eval_opts)
    row |= {k: ev["overall"][k] for k in ("greedy", "pass@1", "pass@1_se") if k in ev["overall"]}
    row["correct"] = [p["correct"] for p in ev["problems"]]
    if ref is not None and args.k:
        diff = [(c - c0) / args.k for c, c0 in zip(row["correct"], ref["correct"])]
        row["pass@1_delta"], row["pass@1_delta_se"] = mean_and_se(diff)
    log(f"{name}: done")
    return row


def table(rows: list[dict], k: int) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    cols = ["variant", "ppl", "ppl/fp32", "greedy agree", "1st diverge", "greedy acc", "pass@1 ± se",
            "Δpass@1 ± se", "model bytes"]
    body = []
    for r in rows:
        if not r["applicable"]:
            body.append([r["variant"], "n/a"] + [""] * (len(cols) - 2))
            continue
        ref = "agreement" not in r  # fp32, the reference
        body.append([r["variant"], f"{r['ppl']:.4f}", f"{r['ppl_ratio']:.4f}", "ref" if ref else pct(r["agreement"]),
                     "ref" if ref else f"{r['first_divergence']:.1f}", pct(r["greedy"]),
                     f"{pct(r['pass@1'])} ± {pct(r['pass@1_se'])}" if k else "-",
                     f"{100 * r['pass@1_delta']:+.1f} ± {100 * r['pass@1_delta_se']:.1f}" if "pass@1_delta" in r
                     else "-", f"{r['bytes'] / 2**20:.2f} MiB"])
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     for cells in [cols, *body])


def targets(rows: dict[str, dict], k: int) -> list[dict]:
    out = []
    for name, limit in PPL_TARGETS.items():
        r = rows[name]
        ok = r["ppl_ratio"] <= limit if r["applicable"] else None  # None: not applicable
        out.append({"target": f"{name} perplexity within {100 * (limit - 1):.1f}% of fp32",
                    "value": f"{100 * (r['ppl_ratio'] - 1):+.2f}%" if r["applicable"] else "n/a", "pass": ok})
        if k:
            d = r.get("pass@1_delta")
            out.append({"target": f"{name} pass@1 at most {100 * PASS_TARGET:.0f} points below fp32",
                        "value": "n/a" if d is None else f"{100 * d:+.1f} points", "pass": None if d is None
                        else d >= -PASS_TARGET})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "nano"), help="trained run: perplexity, greedy agreement")
    ap.add_argument("--grpo", default=str(ROOT / "runs" / "grpo"), help="run for held-out greedy acc and pass@1")
    ap.add_argument("--n", type=int, default=200, help="held-out problems")
    ap.add_argument("--k", type=int, default=4, help="samples per problem for pass@1 (0: greedy only)")
    ap.add_argument("--tokens", type=int, default=256, help="greedy tokens compared with fp32's per prompt")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for the greedy agreement")
    ap.add_argument("--batches", type=int, default=32, help="validation batches for the perplexity")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="completion tokens in the held-out eval (default: the GRPO run's, else 96)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (fp32 is always run)")
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--quick", action="store_true", help="smoke run: n 8, k 2, 32 tokens, 4 prompts, 2 batches")
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.tokens, args.prompts, args.batches = 8, 2, 32, 4, 2
        args.max_tokens = args.max_tokens or 32
    names = ["fp32", *[v for v in args.variants.split(",") if v and v != "fp32"]]
    if unknown := [v for v in names if v not in VARIANTS]:
        ap.error(f"--variants {unknown}: choose from {', '.join(VARIANTS)}")
    args.run, args.grpo = str(Path(args.run)), str(Path(args.grpo))

    loader = val_loader(args.run)
    problems, max_tokens, seed = heldout(args.grpo, args.n)
    eval_opts = {"max_tokens": args.max_tokens or max_tokens or 96, "seed": seed}
    tok = load(args.run, dtype="float32").tokenizer
    prompts = [prompt_ids(p, tok).ids for p in problems[:args.prompts]]
    log(f"{len(names)} variants; perplexity on {args.batches} x {loader.batch_size} x {loader.seq_len} "
        f"validation tokens of {loader.shards.root}; {len(problems)} held-out problems")

    rows = {}
    for name in names:
        rows[name] = measure(name, VARIANTS[name], args, loader, prompts, problems, eval_opts, rows.get("fp32"))
        if rows[name]["applicable"]:
            rows[name]["ppl_ratio"] = rows[name]["ppl"] / rows["fp32"]["ppl"]
    for name in PPL_TARGETS:
        rows.setdefault(name, {"variant": name, "applicable": False, "error": "not run (--variants)"})

    print(f"\nquantization quality: --run {args.run} (perplexity, greedy agreement, bytes), --grpo {args.grpo} "
          f"(held-out accuracy)")
    print(table([rows[n] for n in names], args.k))
    print(f"perplexity: {args.batches} validation batches of {loader.batch_size} x {loader.seq_len} tokens; greedy "
          f"agreement: {len(prompts)} held-out prompts x {args.tokens} tokens (no EOS stop), vs fp32's; held-out: "
          f"{len(problems)} problems, greedy + {args.k} samples (T 0.6, top-p 0.95, seed {seed}), "
          f"{eval_opts['max_tokens']} completion tokens. Δpass@1: vs fp32, paired se over problems")
    quantized = next((r for r in rows.values() if r.get("kept")), None)
    if quantized:
        print(f"int variants: bf16 activations; kept in bf16 (quant.KEEP: {', '.join(quant.KEEP)}; plus embedding, "
              f"norms, router): {', '.join(quantized['kept'])}")
    for r in rows.values():
        if not r["applicable"]:
            print(f"{r['variant']}: not applicable: {r['error']}")
    checks = targets(rows, args.k)
    print("\ntargets:")
    for c in checks:
        print(f"  [{ {True: 'PASS', False: 'FAIL', None: 'N/A '}[c['pass']]}] {c['target']}: {c['value']}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "json"} | eval_opts | {
            "batch_size": loader.batch_size, "seq_len": loader.seq_len, "val_shards": str(loader.shards.root),
            "problems": len(problems), "keep": list(quant.KEEP), "seconds": round(time.perf_counter() - T0, 1)}
        out.write_text(json.dumps({"settings": settings, "variants": [rows[n] for n in names], "targets": checks},
                                  indent=1) + "\n")
        print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
