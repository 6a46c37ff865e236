"""The demo's GRPO stage over several seeds: held-out pass@1 before and after, with the spread, and rollout
tokens/s.

    .venv/bin/python bench/rl_gain.py                      # seeds 0 1 2 from runs/nano, configs/grpo.toml
    .venv/bin/python bench/rl_gain.py --seeds 0 1 steps=30 # fewer seeds, GRPOConfig overrides

The seed changes the training prompts, the sampling seeds and the held-out draw (so "before" is measured
per seed). Runs go to runs/rl_gain/seed<N> (reused if finished: delete them to measure again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.rl.loop import load_grpo_config, run_grpo  # noqa: E402
from nanoseek.demo import finished  # noqa: E402
from nanoseek.runs import latest_checkpoint  # noqa: E402


def one_seed(config: str, init: str, seed: int, overrides: list[str]) -> dict:
    out = ROOT / "runs" / "rl_gain" / f"seed{seed}"
    cfg = load_grpo_config(config, [*overrides, f"seed={seed}", f"init={init}", f"out_dir={out}"])
    if not finished(out):
        run_grpo(cfg, resume=latest_checkpoint(out) is not None, quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    steps = [r for r in records if "reward" in r]
    return {"seed": seed, "before": evals[0], "after": evals[-1],
            "rollout_tok_s": statistics.median(r["rollout_tok_s"] for r in steps),
            "train_s": steps[-1]["elapsed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="GRPOConfig fields as key=value")
    ap.add_argument("--config", default=str(ROOT / "configs" / "grpo.toml"))
    ap.add_argument("--init", default=str(ROOT / "runs" / "nano"), help="the pretrained policy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(args.config, args.init, seed, args.overrides))
        r = rows[-1]
        print(f"seed {seed}: pass@1 {r['before']['pass@1']:.3f} -> {r['after']['pass@1']:.3f}", flush=True)
    print(f"\nGRPO from {args.init} ({args.config} {' '.join(args.overrides)})\n")
    print("| seed | pass@1 before | pass@1 after | gain (points) | greedy before -> after | rollout tok/s | train s |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['seed']} | {b['pass@1']:.3f} | {a['pass@1']:.3f} | {100 * (a['pass@1'] - b['pass@1']):+.1f} | "
              f"{b['greedy']:.3f} -> {a['greedy']:.3f} | {r['rollout_tok_s']:,.0f} | {r['train_s']:.0f} |")
    gains = [100 * (r["after"]["pass@1"] - r["before"]["pass@1"]) for r in rows]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    print(f"\npass@1 gain: {statistics.mean(gains):+.1f} ± {spread:.1f} points (mean ± std over {len(gains)} seeds); "
          f"min {min(gains):+.1f}")


if __name__ == "__main__":
    main()
