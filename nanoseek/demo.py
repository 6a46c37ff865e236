"""`nanoseek demo` (what `make demo` runs): the R1 story on the built-in data, on a laptop CPU.

    1. pretrain the `nano` preset on the built-in reasoning corpus        configs/nano.toml  -> runs/nano
    2. GRPO from it with rule-based rewards                               configs/grpo.toml  -> runs/grpo
    3. the control: continued SFT from the same checkpoint, on the pretraining data (assistant turns), for
       as many seconds of training as GRPO took                            configs/sft.toml   -> runs/sft
    4. the same held-out evaluation of all three (greedy, pass@1 over k samples, maj@k, pass@k) and
       runs/demo/report.md: accuracy before / after, compute per stage, plots, how to chat or serve

A stage whose run directory already holds a finished run is reused (a killed demo resumes where it stopped).
`--seed N` changes every seed of the story (the corpus and its tokenizer, the initialisation, the data order,
the GRPO prompts and samples, the held-out draw); `--runs DIR` puts the stages' run directories and the report
under DIR (bench/rl_gain.py --fresh runs the whole demo this way, once per seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from nanoseek.cost import train_flops_per_token
from nanoseek.hf import load_pretrained
from nanoseek.report import write_report
from nanoseek.rl import loop as rl
from nanoseek.rl.loop import heldout_eval, load_grpo_config
from nanoseek.runs import latest_checkpoint, read_state
from nanoseek.train import loop as pretrain
from nanoseek.train.config import TrainConfig, load_train_config


def finished(run_dir: str | Path) -> bool:
    """Whether the run's last checkpoint marks it finished (its last step, or its time limit)."""
    ckpt = latest_checkpoint(Path(run_dir))
    return ckpt is not None and read_state(ckpt).get("finished", False)


def main(args) -> int:
    runs = Path(args.runs) if getattr(args, "runs", None) else None
    seed = getattr(args, "seed", None)
    seeds = [] if seed is None else [f"seed={seed}"]

    def place(stage: str) -> list[str]:
        return [f"out_dir={runs / stage}"] if runs else []

    out = runs / "demo" if runs else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    t0 = time.perf_counter()

    corpus = [] if seed is None else [f"data.builtin_seed={seed}"]
    base_cfg = load_train_config(args.pretrain_config, [*seeds, *corpus, *place("nano")])
    if not finished(base_cfg.out_dir):
        print(f"== 1/3 pretraining ({args.pretrain_config} -> {base_cfg.out_dir})")
        pretrain.run(base_cfg, resume=latest_checkpoint(Path(base_cfg.out_dir)) is not None, quiet=args.quiet)
    stages["pretrain"] = _stage_summary(base_cfg.out_dir)

    grpo_cfg = load_grpo_config(args.grpo_config, [f"init={base_cfg.out_dir}", *seeds, *place("grpo")])
    if not finished(grpo_cfg.out_dir):
        print(f"== 2/3 GRPO ({args.grpo_config} -> {grpo_cfg.out_dir})")
        rl.run(grpo_cfg, resume=latest_checkpoint(Path(grpo_cfg.out_dir)) is not None, quiet=args.quiet)
    stages["grpo"] = _stage_summary(grpo_cfg.out_dir)

    seconds = stages["grpo"]["train seconds"]
    sft_cfg = load_train_config(args.sft_config, [f"init={base_cfg.out_dir}", f"time_limit={seconds}", *seeds,
                                                 *place("sft")])
    sft_cfg = dataclasses.replace(sft_cfg, data=dataclasses.replace(base_cfg.data, loss_on="assistant"))
    if not finished(sft_cfg.out_dir):
        print(f"== 3/3 control: SFT for the same {seconds:.0f} s ({args.sft_config} -> {sft_cfg.out_dir})")
        pretrain.run(sft_cfg, resume=latest_checkpoint(Path(sft_cfg.out_dir)) is not None, quiet=args.quiet)
    stages["sft control"] = _stage_summary(sft_cfg.out_dir)

    level = f" (difficulty {grpo_cfg.difficulty})" if grpo_cfg.difficulty is not None else ""
    problems = f"{grpo_cfg.eval_problems} held-out problems of {grpo_cfg.tasks}{level}"
    print(f"== evaluation: {problems}, k={grpo_cfg.eval_k}")
    evals = {}
    for name, run_dir in (("pretrained", base_cfg.out_dir), ("after GRPO", grpo_cfg.out_dir),
                          ("SFT control", sft_cfg.out_dir)):
        pre = load_pretrained(run_dir)
        evals[name] = heldout_eval(pre.model, pre.tokenizer, grpo_cfg)
    metrics = list(evals["pretrained"])
    gain = evals["after GRPO"]["pass@1"] - evals["pretrained"]["pass@1"]
    (out / "results.json").write_text(json.dumps({"evals": evals, "stages": stages}, indent=1))
    sections = {
        f"Held-out accuracy ({problems}; pass@1 over {grpo_cfg.eval_k} samples at T=0.6, top-p 0.95)": {
            "metric": " / ".join(metrics),
            **{name: " / ".join(f"{ev[m]:.3f}" for m in metrics) for name, ev in evals.items()},
            "GRPO gain in pass@1": f"{gain * 100:+.1f} points"},
        "Compute per stage": {name: f"{s['train seconds']:.0f} s training, {s['flops']:.2e} FLOPs, "
                                    f"{s['train seconds'] / 3600 * s['cores']:.3f} CPU-core-hours"
                              for name, s in stages.items()},
        "Stage reports": {"pretraining": f"{base_cfg.out_dir}/report.md", "GRPO": f"{grpo_cfg.out_dir}/report.md",
                          "SFT control": f"{sft_cfg.out_dir}/report.md"},
        "Use the result": {"chat": f"`nanoseek chat {grpo_cfg.out_dir}`",
                           "serve (OpenAI API + web chat)": f"`nanoseek serve {grpo_cfg.out_dir}`",
                           "evaluate": f"`nanoseek eval {grpo_cfg.out_dir} --task add --task sub`"},
        "Demo": {"wall time": f"{time.perf_counter() - t0:.0f} s (this invocation)"},
    }
    report = write_report(out, sections)
    _link_plots(out, {"pretrain": base_cfg.out_dir, "grpo": grpo_cfg.out_dir})
    print(f"held-out pass@1: pretrained {evals['pretrained']['pass@1']:.1%} -> after GRPO "
          f"{evals['after GRPO']['pass@1']:.1%} ({gain * 100:+.1f} points); SFT control "
          f"{evals['SFT control']['pass@1']:.1%}")
    print(f"report: {report}")
    return 0


def _stage_summary(run_dir: str) -> dict:
    """Training seconds and FLOPs of a finished run, from its last checkpoint and metrics."""
    state = read_state(latest_checkpoint(Path(run_dir)))
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    flops = state.get("flops")
    if flops is None:  # a pretraining run: FLOPs per token x tokens
        cfg = TrainConfig.from_dict(state["config"])
        tokens = max((r.get("tokens", 0) for r in records), default=0)
        flops = train_flops_per_token(cfg.model, cfg.data.seq_len, mtp=True).total * tokens
    return {"train seconds": state["elapsed"], "flops": flops, "cores": os.cpu_count() or 1}


def _link_plots(out: Path, runs: dict[str, str]) -> None:
    """Append the stages' plots to the demo report (relative links)."""
    lines = ["## Plots", ""]
    for stage, run_dir in runs.items():
        for png in sorted((Path(run_dir) / "plots").glob("*.png")):
            lines.append(f"![{stage} {png.stem}]({Path('..') / Path(run_dir).name / 'plots' / png.name})")
    report = out / "report.md"
    report.write_text(report.read_text() + "\n".join(lines) + "\n")
