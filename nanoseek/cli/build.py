"""Commands that describe and build: model sizes, cost, memory plans, tokenizers and token shards."""

from __future__ import annotations

import argparse
import time

from nanoseek.cli.registry import command
from nanoseek.config import PRESETS, ModelConfig, apply_overrides, fmt_count
from nanoseek.plan import GPU_MEMORY


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("overrides", nargs="*", help="ModelConfig fields as key=value")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-forward", action="store_true", help="only count (for presets too large to allocate)")


@command("model", "build a preset, print parameter counts, time a forward pass", _model_flags)
def cmd_model(args) -> int:
    """Build a preset (with key=value overrides), print its counts, and time a forward pass."""
    import torch

    from nanoseek.model import Transformer
    from nanoseek.runtime import time_forward

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
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    seconds = time_forward(Transformer(cfg).eval(), ids, args.repeats)
    print(f"forward {args.batch}x{args.seq} tokens (fp32, {torch.get_num_threads()} threads): "
          f"{seconds * 1e3:.1f} ms median of {args.repeats}, {args.batch * args.seq / seconds:,.0f} tok/s")
    return 0


def _cost_flags(p: argparse.ArgumentParser) -> None:
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


@command("cost", "parameters, FLOPs/token, cache bytes, MFU, GPU-hours and dollars", _cost_flags)
def cmd_cost(args) -> int:
    """Parameters, FLOPs per token, cache bytes and the compute bill of a config or a run (nanoseek/cost_report.py)."""
    from nanoseek.cost_report import main as cost_main

    return cost_main(args)


def _plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="ModelConfig fields as key=value (with --preset or --config)")
    p.add_argument("--preset", help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--config", help="a Hugging Face config.json")
    p.add_argument("--dp", type=int, required=True, help="data-parallel degree: GPUs, each with its own data")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides --dp and the experts)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--gpu", help=f"compare with one GPU's memory: {', '.join(sorted(GPU_MEMORY))}")
    p.add_argument("--json", action="store_true", help="the same numbers as JSON")


@command("plan", "memory per GPU of a training job at data/expert-parallel degrees", _plan_flags,
         dense_params=None)
def cmd_plan(args) -> int:
    """Memory per GPU at data/expert-parallel degrees: weights, gradients, AdamW state, activations."""
    from nanoseek.plan import main as plan_main

    return plan_main(args)


def _tokenizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--vocab-size", type=int, required=True, help="at most this many tokens")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.json")
    p.add_argument("--text-field", default="text", help="the .jsonl field / .parquet column with the text")


@command("tokenizer", "train a byte-level BPE tokenizer on .txt/.jsonl/.parquet files", _tokenizer_flags)
def cmd_tokenizer(args) -> int:
    """Train a byte-level BPE on text files and save DIR/tokenizer.json (nanoseek/data/tokenizer.py)."""
    from nanoseek.data.documents import check_input, iter_documents
    from nanoseek.data.tokenizer import Tokenizer

    for f in args.input:
        check_input(f)  # fail before training on a missing file
    t0 = time.perf_counter()
    texts = (doc for f in args.input for doc in iter_documents(f, args.text_field))
    tok = Tokenizer.train(texts, args.vocab_size, args.out)
    print(f"tokenizer: {tok.vocab_size:,} tokens (asked {args.vocab_size:,}) -> {tok.path} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _prepare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", metavar="FILE", help=".txt, .jsonl, .parquet, or hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", metavar="DIR", help="a directory made by `nanoseek tokenizer`, or a model folder with a tokenizer.json")
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


@command("prepare", "tokenize files into token shards with a validation split", _prepare_flags)
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
