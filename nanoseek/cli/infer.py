"""Commands that use a model: generate, chat, serve, evaluate, and Hugging Face export / import."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanoseek.cli.registry import command, inference_args, load_model, make_engine, sampling_params


def _generate_flags(p: argparse.ArgumentParser) -> None:
    inference_args(p)
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
    from nanoseek.infer.text import readable

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
    engine = make_engine(args)
    t0 = time.perf_counter()
    results = complete(engine, prompts, sampling_params(args), chat=not args.raw)
    seconds = time.perf_counter() - t0
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        print(f"### {r['prompt']}")
        if r["reasoning"]:
            print(f"[thinking] {r['reasoning'].strip()}")
        print(readable(r["content"]) if not args.raw else r["text"])
    tokens = engine.stats["tokens"]
    line = f"{len(prompts)} prompts, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:,.0f} tok/s)"
    if args.speculative:
        line += f", MTP draft acceptance {engine.acceptance_rate:.0%}"
    print(line, file=sys.stderr)
    return 0


def _chat_flags(p: argparse.ArgumentParser) -> None:
    inference_args(p)


@command("chat", "chat with a trained model in the terminal", _chat_flags)
def cmd_chat(args) -> int:
    """Interactive chat with a checkpoint: reasoning shown apart from the answer."""
    from nanoseek.infer.chat import repl

    engine = make_engine(args)
    repl(engine, sampling_params(args))
    return 0


def _serve_flags(p: argparse.ArgumentParser) -> None:
    inference_args(p, sampling=False)
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
    serve(load_model(args), cfg)
    return 0


def _export_flags(p: argparse.ArgumentParser, fp8: bool = True) -> None:
    p.add_argument("checkpoint", help="a run directory, a checkpoint, or an HF model directory")
    p.add_argument("out", help="the folder to write (with --gguf: the .gguf file)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit")
    if fp8:
        p.add_argument("--gguf", choices=["f32", "bf16", "q8_0", "q4_0"],
                       help="one GGUF file instead, for llama.cpp / Ollama (architecture deepseek2)")
        p.add_argument("--fp8", action="store_true", help="V3's FP8 format: e4m3 weights + fp32 scale per "
                       "128x128 block for the linear layers and experts (embedding, head, norms, gate kept)")
        p.add_argument("--scale-fmt", default="fp32", choices=["fp32", "ue8m0"],
                       help="--fp8: fp32 scales, or power-of-two scales (V3.1's ue8m0)")


@command("import", "a DeepSeek-V3/V2 Hugging Face folder (FP8 dequantized) as a plain fp32 one",
         lambda p: _export_flags(p, fp8=False), fp8=False, scale_fmt="fp32", gguf=None)
@command("export", "a run or checkpoint as a Hugging Face folder (transformers loads it)", _export_flags,
         fp8=False, scale_fmt="fp32")
def cmd_export(args) -> int:
    """A run, checkpoint or DeepSeek folder (FP8 dequantized) as a plain Hugging Face folder, or with --fp8 in
    V3's FP8 format (nanoseek/hf.py)."""
    from nanoseek.hf import export, export_gguf

    if args.gguf:
        out = export_gguf(args.checkpoint, args.out, args.gguf)
        print(f"exported {args.checkpoint} to {out} ({args.gguf}): llama.cpp, Ollama and every nanoseek inference "
              f"command load it")
        return 0
    out = export(args.checkpoint, args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)), fp8=args.fp8,
                 scale_fmt=args.scale_fmt)
    print(f"exported {args.checkpoint} to {out}{' (FP8, V3 format)' if args.fp8 else ''}: "
          f"AutoModelForCausalLM.from_pretrained('{out}') loads it")
    return 0


def _quantize_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory, a checkpoint, or an HF model directory")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4: Q4_0 (int4 in groups of 32, loaded "
                   "as they are), 8: Q8_0 (loaded as int8 per channel)")


@command("quantize", "a run or folder as a quantized GGUF file (Q4_0 / Q8_0) that loads without requantizing",
         _quantize_flags)
def cmd_quantize(args) -> int:
    """Weights quantized once, into a format llama.cpp reads too (nanoseek/gguf_io.py)."""
    from nanoseek.hf import export_gguf

    out = export_gguf(args.checkpoint, args.out, "q4_0" if args.bits == 4 else "q8_0")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): nanoseek generate|chat|serve {out}")
    return 0


def _eval_flags(p: argparse.ArgumentParser) -> None:
    inference_args(p, sampling=False)
    p.add_argument("--task", action="append", default=[],
                   help="a task name or a .jsonl task file (repeatable; default: the built-in held-out mix)")
    p.add_argument("--template", help="chat (the model's template), r1-zero, boxed (chat + 'put your final answer "
                   "within \\boxed{}'), or a string with {prompt} (default: each task's own)")
    p.add_argument("--extractor", help="where the answer is read: answer_tag, boxed (the last \\boxed{}), or "
                   "module:function (default: each task's own)")
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
