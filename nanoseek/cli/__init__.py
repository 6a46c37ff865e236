"""The `nanoseek` command: one subcommand per stage, each a thin wrapper around a `main`.

    build.py  model, cost, plan, tokenizer, prepare
    train.py  train, sft, rl, distill, demo
    infer.py  generate, chat, serve, export, import, eval
"""

from __future__ import annotations

import argparse
import sys

from nanoseek.cli import build, infer, train  # noqa: F401  (each registers its commands)
from nanoseek.cli.registry import COMMANDS
from nanoseek.parallel import DistError


def build_parser() -> argparse.ArgumentParser:
    """One subparser per registered command, in the order the modules register them."""
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, flags, handler, defaults in COMMANDS:
        p = sub.add_parser(name, help=text)
        flags(p)
        p.set_defaults(func=handler, **defaults)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a command's `key=value` overrides may stand anywhere on it, after its flags too
    (argparse alone ends a `nargs="*"` positional at the first flag)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func.__module__ == train.__name__ and (asked := _quantize_asked(args, rest)):
        parser.error(f"{args.command} {asked}: quantized weights are for inference only (the packed int8/int4 "
                     "weights are not trainable); --quantize is an option of generate, chat, serve and eval"
                     + {"distill": "; the teacher's is distill.teacher_quantize=int8|int4",
                        "rl": "; GRPO's group size is the override group_size=N"}.get(args.command, ""))
    if rest and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _quantize_asked(args: argparse.Namespace, rest: list[str]) -> str | None:
    """The first --quantize / --group-size / --quantize-head flag, or quantize= / quantize_head= override (any
    dotted form), on the command line; None when there is none."""
    flags = [a for a in rest if a.partition("=")[0] in ("--quantize", "--group-size", "--quantize-head")]
    keys = [o for o in getattr(args, "overrides", [])
            if o.partition("=")[0].strip().rpartition(".")[2] in ("quantize", "quantize_head")]
    return next(iter(flags + keys), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration and input errors speak to the user, without a traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DistError as e:  # a distributed job that cannot go on (a rank died, a collective timed out)
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 1

