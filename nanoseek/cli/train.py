"""Commands that train: pretraining and SFT, GRPO, distillation and the demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.cli.registry import command
from nanoseek.config import apply_overrides


def _start(settings, quiet: bool) -> None:
    """A training command's start-up: the allocator setting of its kernels (nanoseek/kernels/memory.py), said."""
    from nanoseek import kernels

    line = kernels.start_process(settings)
    if line and not quiet:
        print(line)


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
    from nanoseek.rl.evaluate import heldout_section
    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import run

    sft = args.command == "sft"
    cfg = load_train_config(args.config, (["data.loss_on=assistant"] if sft else []) + args.overrides)
    if sft and not cfg.init:
        raise ValueError("nanoseek sft needs init=DIR: the run, checkpoint or HF directory to fine-tune")
    _start(cfg.kernels, args.quiet)
    result = run(cfg, resume=args.resume, quiet=args.quiet)
    if result.rank != 0:  # under torchrun, rank 0 evaluates and reports
        return 0
    cfg = result.config
    sections = result.sections
    if not cfg.data.path and args.eval_problems:
        problems = heldout(args.eval_problems, mix=get_mix(cfg.data.builtin_mix))
        section, accuracy = heldout_section(result.model, result.tokenizer, problems, progress=not args.quiet)
        print(f"held-out accuracy (greedy, {len(problems)} problems): {accuracy:.1%}")
        write_report(cfg.out_dir, {**sections, "Held-out accuracy (greedy)": section})
    print(f"report: {result.report}  plots: {Path(cfg.out_dir) / 'plots'}  metrics: "
          f"{Path(cfg.out_dir) / 'metrics.jsonl'}")
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
    _start(cfg.kernels, args.quiet)
    result = run(cfg, resume=args.resume, quiet=args.quiet)
    print(f"report: {result.report}  plots: {Path(cfg.out_dir) / 'plots'}  metrics: "
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
    from nanoseek.rl.distill import DistillConfig, check_student_overrides, distill, split_overrides
    from nanoseek.train.config import load_train_config

    ours, student = split_overrides(args.overrides)
    cfg = apply_overrides(DistillConfig(), ours)
    check_student_overrides(student)
    _start(load_train_config(args.student_config, student).kernels, args.quiet)
    result = distill(cfg, args.student_config, student, quiet=args.quiet)
    print(f"data: {cfg.out_dir}/distill.jsonl  summary: {cfg.out_dir}/summary.json  "
          f"student report: {result['student'].report}")
    return 0


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrain-config", default="configs/nano.toml")
    p.add_argument("--grpo-config", default="configs/grpo.toml")
    p.add_argument("--sft-config", default="configs/sft.toml")
    p.add_argument("--out", default="runs/demo", help="where the demo report goes")
    p.add_argument("--seed", type=int, default=None, help="one seed for every stage (corpus, init, data, sampling)")
    p.add_argument("--runs", default=None, help="put every stage's run directory and the report under this folder")
    p.add_argument("--quiet", action="store_true")


@command("demo", "the R1 story on the built-in data: pretrain, GRPO, SFT control, report", _demo_flags)
def cmd_demo(args) -> int:
    """Pretrain, GRPO, an SFT control, evaluation and a report (nanoseek/demo.py)."""
    from nanoseek.demo import main as demo_main
    from nanoseek.train.config import load_train_config

    _start(load_train_config(args.pretrain_config).kernels, args.quiet)
    return demo_main(args)
