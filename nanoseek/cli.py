"""The `nanoseek` command: one subcommand per stage, each a thin wrapper around a `main`."""

from __future__ import annotations

import os

# Transparent huge pages for torch's large CPU allocations, for the `nanoseek` command only (torch reads this
# when it loads, so it is set before any torch import; importing nanoseek as a library changes nothing):
# decoding streams every weight once per token, and 4 KiB pages cost it ~10% in TLB misses here (docs/LOG.md,
# session 4). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
from collections.abc import Callable  # noqa: E402
import sys
import time
from pathlib import Path

from nanoseek.config import PRESETS, ModelConfig, apply_overrides, fmt_count
from nanoseek.dist import DistError
from nanoseek.plan import GPU_MEMORY

COMMANDS: list[tuple[str, str, Callable, Callable, dict]] = []  # (name, help, flags, handler, defaults)


def command(name: str, text: str, flags: Callable[[argparse.ArgumentParser], None] = lambda p: None, **defaults):
    """Register `nanoseek NAME` with its help, its flags (declared beside the handler) and extra defaults."""
    def register(handler: Callable) -> Callable:
        COMMANDS.append((name, text, flags, handler, defaults))
        return handler
    return register


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


def _train_flags(p: argparse.ArgumentParser, example: str = "configs/*.toml") -> None:
    p.add_argument("overrides", nargs="*", help="TrainConfig fields as key=value (dotted: optim.lr=1e-3, "
                                                "init=runs/nano, data.path=...)")
    p.add_argument("--config", help=f"a TOML run file ({example})")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems to score at the end (0: off)")


@command("sft", "supervised fine-tuning: train from init=DIR, loss on assistant turns only",
         lambda p: _train_flags(p, "configs/sft.toml"))
@command("train", "pretrain a model (built-in corpus by default); --resume continues a run", _train_flags)
def cmd_train(args) -> int:
    """Pretrain or fine-tune (sft) a run, or resume one; on the built-in corpus, finish with greedy held-out
    accuracy."""
    from nanoseek.data.builtin import get_mix, heldout
    from nanoseek.report import write_report
    from nanoseek.rl.evaluate import greedy_accuracy
    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import run

    sft = args.command == "sft"
    cfg = load_train_config(args.config, (["data.loss_on=assistant"] if sft else []) + args.overrides)
    if sft and not cfg.init:
        raise ValueError("nanoseek sft needs init=DIR: the run, checkpoint or HF directory to fine-tune")
    result = run(cfg, resume=args.resume, quiet=args.quiet)
    if result.get("rank", 0) != 0:  # under torchrun, rank 0 evaluates and reports
        return 0
    cfg = result["config"]
    sections = result["sections"]
    if not cfg.data.path and args.eval_problems:
        problems = heldout(args.eval_problems, mix=get_mix(cfg.data.builtin_mix))
        ev = greedy_accuracy(result["model"], result["tokenizer"], problems, progress=not args.quiet)
        sections["Held-out accuracy (greedy)"] = {"problems": ev["n"], "accuracy": f"{ev['accuracy']:.1%}"} | {
            f"sample {i}": f"`{s['prompt']}` -> `{s['completion']}` ({'right' if s['correct'] else 'wrong'})"
            for i, s in enumerate(ev["samples"][:4])}
        print(f"held-out accuracy (greedy, {ev['n']} problems): {ev['accuracy']:.1%}")
        write_report(cfg.out_dir, sections)
    print(f"report: {result['report']}  plots: {Path(cfg.out_dir) / 'plots'}  metrics: "
          f"{Path(cfg.out_dir) / 'metrics.jsonl'}")
    return 0


def _pretrained(args):
    """The model directory (run, checkpoint or HF format) on --device in --dtype, with its tokenizer."""
    from nanoseek.hf import load_pretrained

    return load_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, needs_tokenizer="text generation")


def _engine(args):
    from nanoseek.infer.engine import Engine

    pre = _pretrained(args)
    return Engine(pre.model, pre.tokenizer, max_batch=args.max_batch, speculative=args.speculative)


def _sampling(args):
    from nanoseek.infer.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))


def _generate_flags(p: argparse.ArgumentParser) -> None:
    _inference_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (or .jsonl with a prompt field)")
    p.add_argument("--raw", action="store_true", help="plain continuation, no chat template")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")


@command("generate", "complete prompts with a trained model", _generate_flags)
def cmd_generate(args) -> int:
    """Complete prompts (--prompt, repeatable, or --prompts FILE: one per line or JSONL with "prompt")."""
    import json

    from nanoseek.data.documents import iter_jsonl
    from nanoseek.infer.chat import complete

    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ValueError(f"--prompts {path}: no such file")
        if path.suffix == ".jsonl":
            for lineno, row in iter_jsonl(path):
                if not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}:{lineno}: needs a string \"prompt\" field")
                prompts.append(row["prompt"])
        else:
            prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts file")
    engine = _engine(args)
    t0 = time.perf_counter()
    results = complete(engine, prompts, _sampling(args), chat=not args.raw)
    seconds = time.perf_counter() - t0
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        print(f"### {r['prompt']}")
        if r["reasoning"]:
            print(f"[thinking] {r['reasoning'].strip()}")
        print(r["content"] if not args.raw else r["text"])
    tokens = engine.stats["tokens"]
    line = f"{len(prompts)} prompts, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:,.0f} tok/s)"
    if args.speculative:
        line += f", MTP draft acceptance {engine.acceptance_rate:.0%}"
    print(line, file=sys.stderr)
    return 0


def _chat_flags(p: argparse.ArgumentParser) -> None:
    _inference_args(p)


@command("chat", "chat with a trained model in the terminal", _chat_flags)
def cmd_chat(args) -> int:
    """Interactive chat with a checkpoint: reasoning shown apart from the answer."""
    from nanoseek.infer.chat import repl

    engine = _engine(args)
    repl(engine, _sampling(args))
    return 0


def _serve_flags(p: argparse.ArgumentParser) -> None:
    _inference_args(p, sampling=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY")
    p.add_argument("--max-concurrent", type=int, default=32, help="requests in flight; more get HTTP 429")
    p.add_argument("--max-len", type=int, help="context (prompt + completion) in tokens (default: the model's)")
    p.add_argument("--model-name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take in all; past it the client gets HTTP 408")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies get HTTP 413")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGTERM / Ctrl-C")


@command("serve", "OpenAI-compatible API server and web chat (http://127.0.0.1:8000)", _serve_flags)
def cmd_serve(args) -> int:
    """The OpenAI-compatible server and the web chat page (nanoseek/infer/server.py)."""
    from nanoseek.infer.server import ServeConfig, serve

    cfg = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_concurrent=args.max_concurrent,
                      max_batch=args.max_batch, speculative=args.speculative, max_len=args.max_len,
                      model_name=args.model_name, request_timeout=args.request_timeout,
                      max_body_bytes=int(args.max_body_mb * (1 << 20)), shutdown_grace=args.shutdown_grace)
    serve(_pretrained(args), cfg)
    return 0


def _rl_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="GRPOConfig fields as key=value (dotted: optim.lr=1e-4)")
    p.add_argument("--config", help="a TOML run file (configs/grpo.toml)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


@command("rl", "GRPO with verifiable rewards from init=DIR (configs/grpo.toml)", _rl_flags)
def cmd_rl(args) -> int:
    """GRPO with rule-based rewards from a trained policy (nanoseek/rl/loop.py)."""
    from nanoseek.rl.loop import load_grpo_config, run

    cfg = load_grpo_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume, quiet=args.quiet)
    print(f"report: {result['report']}  plots: {Path(cfg.out_dir) / 'plots'}  metrics: "
          f"{Path(cfg.out_dir) / 'metrics.jsonl'}  samples: {Path(cfg.out_dir) / 'samples.jsonl'}")
    return 0


def _distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="distill.FIELD=value (teacher, k, prompts, tasks, ...) and the "
                   "student's TrainConfig fields (preset=nano, steps=300, ...)")
    p.add_argument("--student-config", help="a TOML run file for the student (default: TrainConfig defaults)")
    p.add_argument("--quiet", action="store_true")


@command("distill", "rejection sampling from a teacher, then SFT of a student on verified data",
         _distill_flags)
def cmd_distill(args) -> int:
    """Rejection sampling from a teacher, then SFT of a student on the verified completions."""
    from nanoseek.rl.distill import DistillConfig, distill

    cfg = apply_overrides(DistillConfig(), [o[len("distill."):] for o in args.overrides
                                            if o.startswith("distill.")])
    student = [o for o in args.overrides if not o.startswith("distill.")]
    result = distill(cfg, args.student_config, student, quiet=args.quiet)
    print(f"data: {cfg.out_dir}/distill.jsonl  summary: {cfg.out_dir}/summary.json  "
          f"student report: {result['student']['report']}")
    return 0


def _export_flags(p: argparse.ArgumentParser, fp8: bool = True) -> None:
    p.add_argument("checkpoint", help="a run directory, a checkpoint, or an HF model directory")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit")
    if fp8:
        p.add_argument("--fp8", action="store_true", help="V3's FP8 format: e4m3 weights + fp32 scale per "
                       "128x128 block for the linear layers and experts (embedding, head, norms, gate kept)")
        p.add_argument("--scale-fmt", default="fp32", choices=["fp32", "ue8m0"],
                       help="--fp8: fp32 scales, or power-of-two scales (V3.1's ue8m0)")


@command("import", "a DeepSeek-V3/V2 Hugging Face folder (FP8 dequantized) as a plain fp32 one",
         lambda p: _export_flags(p, fp8=False), fp8=False, scale_fmt="fp32")
@command("export", "a run or checkpoint as a Hugging Face folder (transformers loads it)", _export_flags,
         fp8=False, scale_fmt="fp32")
def cmd_export(args) -> int:
    """A run, checkpoint or DeepSeek folder (FP8 dequantized) as a plain Hugging Face folder, or with --fp8 in
    V3's FP8 format (nanoseek/hf.py)."""
    from nanoseek.hf import export

    out = export(args.checkpoint, args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)), fp8=args.fp8,
                 scale_fmt=args.scale_fmt)
    print(f"exported {args.checkpoint} to {out}{' (FP8, V3 format)' if args.fp8 else ''}: "
          f"AutoModelForCausalLM.from_pretrained('{out}') loads it")
    return 0


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrain-config", default="configs/nano.toml")
    p.add_argument("--grpo-config", default="configs/grpo.toml")
    p.add_argument("--sft-config", default="configs/sft.toml")
    p.add_argument("--out", default="runs/demo", help="where the demo report goes")
    p.add_argument("--quiet", action="store_true")


@command("demo", "the R1 story on the built-in data: pretrain, GRPO, SFT control, report", _demo_flags)
def cmd_demo(args) -> int:
    """Pretrain, GRPO, an SFT control, evaluation and a report (nanoseek/demo.py)."""
    from nanoseek.demo import main as demo_main

    return demo_main(args)


def _eval_flags(p: argparse.ArgumentParser) -> None:
    _inference_args(p, sampling=False)
    p.add_argument("--task", action="append", default=[],
                   help="a task name or a .jsonl task file (repeatable; default: the built-in held-out mix)")
    p.add_argument("--n", type=int, default=200, help="held-out problems (per task with --task)")
    p.add_argument("--k", type=int, default=8, help="samples per problem for pass@1, maj@k, pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0, help="problem draw and sample seeds")
    p.add_argument("--out", metavar="FILE.json", help="write the JSON report here")


@command("eval", "held-out evaluation: greedy, pass@1 ± se, maj@k, pass@k, format, length", _eval_flags,
         max_batch=64)
def cmd_eval(args) -> int:
    """Held-out evaluation: greedy, pass@1 ± se over k samples, maj@k, pass@k (nanoseek/rl/evaluate.py)."""
    from nanoseek.rl.evaluate import main as eval_main

    return eval_main(args)


def _inference_args(p, sampling: bool = True) -> None:
    p.add_argument("checkpoint", help="a run directory (latest checkpoint), a checkpoint, or an HF model directory")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    if sampling:
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per registered command, in the order the handlers are defined above."""
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, flags, handler, defaults in COMMANDS:
        p = sub.add_parser(name, help=text)
        flags(p)
        p.set_defaults(func=handler, **defaults)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration and input errors speak to the user, without a traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DistError as e:  # a distributed job that cannot go on (a rank died, a collective timed out)
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
