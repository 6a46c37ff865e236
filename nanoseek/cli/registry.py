"""The command registry: `@command` declares a subcommand, its flags beside its handler; and the flags and
helpers the inference commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: list[tuple[str, str, Callable, Callable, dict]] = []  # (name, help, flags, handler, defaults)


def command(name: str, text: str, flags: Callable[[argparse.ArgumentParser], None] = lambda p: None, **defaults):
    """Register `nanoseek NAME` with its help, its flags (declared beside the handler) and extra defaults."""
    def register(handler: Callable) -> Callable:
        COMMANDS.append((name, text, flags, handler, defaults))
        return handler
    return register


def inference_args(p, sampling: bool = True) -> None:
    p.add_argument("checkpoint", help="a run directory (latest checkpoint), a checkpoint, an HF model directory or "
                   "a deepseek2 .gguf file")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: as the checkpoint is stored (a bf16 folder stays bf16)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only int8 (per channel) or int4 (groups) on the CPU, quantized while loading; "
                   "--dtype (auto: bfloat16) is then the activations' and the kept tensors' dtype. auto: a .gguf "
                   "file's own precision (4-bit blocks: int4 in groups of 32, others int8), none for a folder")
    p.add_argument("--group-size", type=int, default=128, help="--quantize int4: input channels per scale")
    p.add_argument("--quantize-head", action="store_true", help="quantize the output head too (kept by default)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    if sampling:
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def load_model(args, use: str = "text generation"):
    """The model directory (run, checkpoint or HF format) on --device in --dtype, --quantize'd, with its
    tokenizer."""
    from nanoseek import quant
    from nanoseek.hf import load_pretrained

    spec = quant.parse(args.quantize, args.group_size, args.quantize_head)
    return load_pretrained(args.checkpoint, device=args.device or ("cpu" if isinstance(spec, quant.Spec) else None),
                           dtype=args.dtype, needs_tokenizer=use, quantize=spec)


def make_engine(args):
    from nanoseek.infer.engine import Engine

    pre = load_model(args)
    return Engine(pre.model, pre.tokenizer, max_batch=args.max_batch, speculative=args.speculative)


def sampling_params(args):
    from nanoseek.infer.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
