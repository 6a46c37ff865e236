"""The `nanoseek` command: one subcommand per stage, each a thin wrapper around a `main`."""

from __future__ import annotations

import argparse
import sys
import time

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
