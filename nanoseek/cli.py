"""The `nanoseek` command: one subcommand per stage, each a thin wrapper around a `main`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanoseek.config import PRESETS, ModelConfig, apply_overrides, fmt_count


def cmd_model(args) -> int:
    """Build a preset (with key=value overrides), print its counts, and time a forward pass."""
    import torch

    from nanoseek.model import Transformer

    cfg = apply_overrides(ModelConfig.preset(args.preset), args.overrides)
    p = cfg.num_params()
    rows = [("preset", args.preset), ("layers (dense + MoE)", f"{cfg.num_hidden_layers} "
            f"({cfg.first_k_dense_replace} + {cfg.num_hidden_layers - cfg.first_k_dense_replace})"),
            ("hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads}"),
            ("routed experts", f"{cfg.n_routed_experts} (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
             f"top-{cfg.topk_group} groups), shared {cfg.n_shared_experts}"),
            ("parameters total", f"{fmt_count(p.total)} ({p.total:,})"),
            ("parameters activated", f"{fmt_count(p.activated)} ({p.activated:,})"),
            ("MTP modules", f"{cfg.num_nextn_predict_layers} ({fmt_count(p.mtp)})"),
            ("MLA cache / token (bf16)", f"{cfg.cache_bytes_per_token(2):,} B")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.no_forward:
        return 0
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    best = sorted(times[1:])[len(times[1:]) // 2]
    print(f"forward {args.batch}x{args.seq} tokens (fp32, {torch.get_num_threads()} threads): "
          f"{best * 1e3:.1f} ms median of {args.repeats}, {args.batch * args.seq / best:,.0f} tok/s")
    return 0


def cmd_cost(args) -> int:
    """Parameters, FLOPs per token, cache bytes and the compute bill of a config or a run (nanoseek/cost.py)."""
    from nanoseek.cost import main as cost_main

    return cost_main(args)


def cmd_tokenizer(args) -> int:
    """Train a byte-level BPE on text files and save DIR/tokenizer.json (nanoseek/data/tokenizer.py)."""
    from nanoseek.data.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.train(list(args.input), args.vocab_size, args.out, text_field=args.text_field)
    print(f"tokenizer: {tok.vocab_size:,} tokens (asked {args.vocab_size:,}) -> {tok.path} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_prepare(args) -> int:
    """Tokenize files into memory-mapped shards with a val split (nanoseek/data/shards.py), or build the
    built-in reasoning corpus with --builtin (nanoseek/data/builtin.py)."""
    import json

    from nanoseek.data.builtin import ensure_builtin_data
    from nanoseek.data.shards import ShardSet, prepare
    from nanoseek.data.tokenizer import Tokenizer

    if args.builtin == bool(args.input):
        raise ValueError("give either --input FILES (with --tokenizer) or --builtin")
    if args.builtin:
        out = ensure_builtin_data(args.out, args.vocab_size, args.seed, args.docs, p_err=args.p_err)
        s = ShardSet.open(out)
        summary = {"out_dir": str(out), "vocab_size": s.vocab_size,
                   **{k: {"docs": v["docs"], "tokens": v["tokens"]} for k, v in s.index["splits"].items()}}
    else:
        if not args.tokenizer:
            raise ValueError("--tokenizer DIR is required with --input (make one with `nanoseek tokenizer`)")
        summary = prepare(args.input, Tokenizer.load(args.tokenizer), args.out, text_field=args.text_field,
                          val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers,
                          seed=args.seed)
    print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    """Pretrain (or resume) a run; on the built-in corpus, finish with greedy held-out accuracy."""
    from nanoseek.data.builtin import heldout
    from nanoseek.report import write_report
    from nanoseek.rl.evaluate import greedy_accuracy
    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import run

    cfg = load_train_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume, quiet=args.quiet)
    cfg = result["config"]
    sections = result["sections"]
    if not cfg.data.path and args.eval_problems:
        ev = greedy_accuracy(result["model"], result["tokenizer"], heldout(args.eval_problems), progress=not args.quiet)
        sections["Held-out accuracy (greedy)"] = {"problems": ev["n"], "accuracy": f"{ev['accuracy']:.1%}"} | {
            f"sample {i}": f"`{s['prompt']}` -> `{s['completion']}` ({'right' if s['correct'] else 'wrong'})"
            for i, s in enumerate(ev["samples"][:4])}
        print(f"held-out accuracy (greedy, {ev['n']} problems): {ev['accuracy']:.1%}")
        write_report(cfg.out_dir, sections)
    print(f"report: {result['report']}  plots: {Path(cfg.out_dir) / 'plots'}  metrics: "
          f"{Path(cfg.out_dir) / 'metrics.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model", help="build a preset, print parameter counts, time a forward pass")
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("overrides", nargs="*", help="ModelConfig fields as key=value")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-forward", action="store_true", help="only count (for presets too large to allocate)")
    p.set_defaults(func=cmd_model)
    p = sub.add_parser("train", help="pretrain a model (built-in corpus by default); --resume continues a run")
    p.add_argument("overrides", nargs="*", help="TrainConfig fields as key=value (dotted: optim.lr=1e-3)")
    p.add_argument("--config", help="a TOML run file (configs/*.toml)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems to score at the end (0: off)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("cost", help="parameters, FLOPs/token, cache bytes, MFU, GPU-hours and dollars")
    p.add_argument("overrides", nargs="*", help="ModelConfig fields as key=value (with --preset or --config)")
    p.add_argument("--preset", help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--config", help="a Hugging Face config.json")
    p.add_argument("--dense-params", help="a dense model of N parameters, e.g. 405e9 or 405B")
    p.add_argument("--paper", action="store_true", help="the V3 paper's cost table, checked; Llama 3.1 405B")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence / inference context length")
    p.add_argument("--tokens", help="training tokens, e.g. 14.8T (K/M/B/T suffixes)")
    p.add_argument("--gpu", help="h800 (default), h100, h200, a100, or cpu (measures a GEMM peak now)")
    p.add_argument("--precision", help="bf16 (default on GPUs) or fp8; cpu measures fp32")
    p.add_argument("--mfu", help="assumed model FLOPs utilization in (0, 1]")
    p.add_argument("--tokens-per-second", help="measured throughput per device (instead of --mfu)")
    p.add_argument("--num-gpus", type=int, default=1, help="for days of wall-clock")
    p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour (V3 paper: $2)")
    p.add_argument("--gqa-groups", type=int, default=8, help="KV heads of the GQA cache compared with MLA")
    p.add_argument("--json", action="store_true", help="the same numbers as JSON")
    p.set_defaults(func=cmd_cost)
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on .txt/.jsonl/.parquet files")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--vocab-size", type=int, required=True, help="at most this many tokens")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.json")
    p.add_argument("--text-field", default="text", help="the .jsonl field / .parquet column with the text")
    p.set_defaults(func=cmd_tokenizer)
    p = sub.add_parser("prepare", help="tokenize files into token shards with a validation split")
    p.add_argument("--input", nargs="+", metavar="FILE", help=".txt, .jsonl, .parquet, or hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", metavar="DIR", help="a directory made by `nanoseek tokenizer`")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--text-field", default="text", help="the .jsonl field / .parquet column with the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (by text hash)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (ends at a document)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer threads")
    p.add_argument("--seed", type=int, default=0, help="salts the val split hash (--builtin: the corpus seed)")
    p.add_argument("--builtin", action="store_true", help="build the built-in reasoning corpus under --out")
    p.add_argument("--vocab-size", type=int, default=2048, help="--builtin: tokenizer vocabulary bound")
    p.add_argument("--docs", type=int, default=60000, help="--builtin: number of documents")
    p.add_argument("--p-err", type=float, default=0.0, help="--builtin: imitation noise of add/sub traces")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration and input errors speak to the user, without a traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
