"""Where one GRPO step goes: the rollout (engine) and the update (log-probs, loss, backward, AdamW), each under
torch.profiler, at the demo's settings or any GRPOConfig overrides.

    .venv/bin/python bench/grpo_profile.py                        # configs/grpo.toml from runs/nano
    .venv/bin/python bench/grpo_profile.py --init runs/small max_completion_tokens=256 --top 40

Two warm-up steps, then `--steps` profiled ones; per stage the seconds per step, its op table (self CPU ms per
step) and the same time in groups (bench/train_profile.py's). The update is the loop's own `update`; the
rollout is the loop's own `rollout` on the loop's engine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from nanoseek import kernels  # noqa: E402
from nanoseek.hf import load_pretrained  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.rl.grpo import group_advantages  # noqa: E402
from nanoseek.rl.loop import load_grpo_config, rollout, sample_problems, update  # noqa: E402
from nanoseek.rl.rewards import Rewards  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from train_profile import print_profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="GRPOConfig fields as key=value")
    ap.add_argument("--config", default=str(ROOT / "configs" / "grpo.toml"))
    ap.add_argument("--init", default=str(ROOT / "runs" / "nano"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    cfg = load_grpo_config(args.config, [*args.overrides, f"init={args.init}"])
    pre = load_pretrained(cfg.init, dtype=torch.float32)
    model, tok = pre.model, pre.tokenizer
    kernels.start_process(cfg.kernels)  # as `nanoseek rl`: glibc keeps freed memory, the kernels applied
    kernels.apply(model, cfg.kernels)
    model.mtp.requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim)
    rewards = Rewards({"accuracy": cfg.accuracy_weight, "format": cfg.format_weight}, [])
    engine = Engine(model, tok, max_batch=min(cfg.prompts_per_step * cfg.group_size, 256),
                    max_len=cfg.max_prompt_tokens + cfg.max_completion_tokens)
    ops = {"rollout": {}, "update": {}}  # stage -> op -> [self CPU ms, calls], summed over the profiled steps
    wall = {"rollout": 0.0, "update": 0.0}

    @contextlib.contextmanager
    def profiled(stage: str, timed: bool):
        """The stage under a profiler of its own (one per step: a re-entered profiler keeps its last run only)."""
        if not timed:
            yield
            return
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        for e in prof.key_averages():
            acc = ops[stage].setdefault(e.key, [0.0, 0])
            acc[0] += e.self_cpu_time_total / 1e3
            acc[1] += e.count

    tokens = {"rollout": 0, "update": 0}
    for step in range(2 + args.steps):
        timed = step >= 2
        problems = sample_problems(cfg, step)
        model.eval()
        with profiled("rollout", timed):
            t0 = time.perf_counter()
            batch = rollout(engine, problems, cfg, step)
            t1 = time.perf_counter()
        scores = [rewards(problems[n // cfg.group_size], text)["total"] for n, text in enumerate(batch.texts)]
        adv = group_advantages(torch.tensor(scores).view(-1, cfg.group_size), scale=cfg.advantage == "grpo").flatten()
        with profiled("update", timed):
            t2 = time.perf_counter()
            update(model, optimizer, None, batch, adv, cfg, step)
            t3 = time.perf_counter()
        if timed:
            wall["rollout"] += t1 - t0
            wall["update"] += t3 - t2
            tokens["rollout"] += sum(batch.lengths)
            tokens["update"] += batch.ids.numel()
        print(f"step {step + 1}: rollout {t1 - t0:.2f} s ({sum(batch.lengths)} tokens), update {t3 - t2:.2f} s "
              f"({tuple(batch.ids.shape)} ids, {int(batch.mask.sum())} with loss)", flush=True)
    results = {}
    for stage, table in ops.items():
        rows = [(key, ms / args.steps, calls // args.steps) for key, (ms, calls) in table.items()]
        results[stage] = (wall[stage] / args.steps, sorted(rows, key=lambda r: -r[1]))
    print(f"\nGRPO from {cfg.init}: {cfg.prompts_per_step} x {cfg.group_size}, {cfg.max_completion_tokens} tokens; "
          f"{args.threads} threads, {args.steps} profiled steps (tok/s: rollout = generated, update = ids)\n")
    for stage in results:
        print_profile({stage: results[stage]}, args.top, tokens[stage] // args.steps)
        print()


if __name__ == "__main__":
    main()
