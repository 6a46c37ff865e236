"""The demo's GRPO stage over several seeds: held-out pass@1 before and after, with the spread, and rollout
tokens/s.

    .venv/bin/python bench/rl_gain.py                      # seeds 0 1 2 from runs/nano, configs/grpo.toml
    .venv/bin/python bench/rl_gain.py --seeds 0 1 steps=30 # fewer seeds, GRPOConfig overrides
    .venv/bin/python bench/rl_gain.py --fresh              # the whole demo from scratch, seeds 0 1 2

--fresh runs `nanoseek demo --seed S --runs runs/fresh/seed<S>` for each seed S (each stage reused when
finished): the seed changes the corpus, the initialisation, the data order and the sampling, standing in for
the float rounding of another machine, which tips the pretraining's phase change the same way. It prints each
stage's held-out pass@1 and the spread over runs.

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


def fresh(seeds: list[int], quiet: bool) -> None:
    """The whole demo from scratch once per seed; a row per run and the spread."""
    from nanoseek.demo import main as demo

    rows = []
    n = len(seeds)
    for seed in seeds:
        runs = ROOT / "runs" / "fresh" / f"seed{seed}"
        args = argparse.Namespace(seed=seed, runs=str(runs), quiet=quiet, out=None,
                                  pretrain_config=str(ROOT / "configs" / "nano.toml"),
                                  grpo_config=str(ROOT / "configs" / "grpo.toml"),
                                  sft_config=str(ROOT / "configs" / "sft.toml"))
        demo(args)
        result = json.loads((runs / "demo" / "results.json").read_text())
        rows.append({"seed": seed, **{k: v["pass@1"] for k, v in result["evals"].items()},
                     "greedy": result["evals"]["pretrained"]["greedy"],
                     "seconds": sum(s["train seconds"] for s in result["stages"].values())})
    print("\n| seed | pretrained greedy | pass@1 pretrained | after GRPO | SFT control | GRPO gain (points) |"
          " GRPO - SFT (points) | training s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['greedy']:.3f} | {r['pretrained']:.3f} | {r['after GRPO']:.3f} | "
              f"{r['SFT control']:.3f} | {100 * (r['after GRPO'] - r['pretrained']):+.1f} | "
              f"{100 * (r['after GRPO'] - r['SFT control']):+.1f} | {r['seconds']:.0f} |")
    for name in ("pretrained", "after GRPO", "SFT control"):
        values = [100 * r[name] for r in rows]
        print(f"{name}: pass@1 {statistics.median(values):.1f}% (min {min(values):.1f}, max {max(values):.1f}) "
              f"over {n} fresh runs")
    gains = [100 * (r["after GRPO"] - r["pretrained"]) for r in rows]
    print(f"GRPO gain: min {min(gains):+.1f}, median {statistics.median(gains):+.1f}, max {max(gains):+.1f} points; "
          f"GRPO above the SFT control in {sum(r['after GRPO'] > r['SFT control'] for r in rows)} of {n} runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="GRPOConfig fields as key=value")
    ap.add_argument("--config", default=str(ROOT / "configs" / "grpo.toml"))
    ap.add_argument("--init", default=str(ROOT / "runs" / "nano"), help="the pretrained policy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fresh", action="store_true", help="run the whole demo from scratch once per seed")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.fresh:
        return fresh(args.seeds, args.quiet)
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
