"""nanoseek's GRPO loop against TRL's GRPOTrainer, side by side (issue 19).

    .venv/bin/python bench/grpo_vs_trl.py                                   # the demo's settings, from runs/nano
    .venv/bin/python bench/grpo_vs_trl.py --setting small --init runs/small  # 256-token completions
    .venv/bin/python bench/grpo_vs_trl.py --init RUN --steps 2 --rounds 1 prompts_per_step=2 group_size=2  # smoke

Same weights: the run is exported once (`nanoseek export`) and both load that folder. Same prompts in the same
order: nanoseek draws them per step (`sample_problems`); TRL gets those rows as its dataset, unshuffled. Same
reward: nanoseek's (accuracy + 0.1 format, on the prompt's think opener + the completion), as a TRL reward
function. Same optimizer and schedule: `build_optimizer` on each model and `lr_at` as TRL's scheduler. The
other settings are mapped field by field from the GRPOConfig (configs/grpo.toml + key=value overrides) to
trl.GRPOConfig and read back; the table marks any mismatch (≠) and what has no counterpart (·).

Per side and step: seconds per step, generation seconds (nanoseek: `gen_time` in metrics.jsonl; TRL: its
`_generate_single_turn`) and their share, rollout tokens/s (completion tokens / generation seconds), update
seconds (the step less generation: scoring, log-probs, forward + backward, optimizer) and the reward. Each
round runs nanoseek, then TRL (fp32, --threads threads); a round's figure is the median of steps 2..N, and
the report gives the median over rounds with [min-max].
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.cost import inference_flops_per_token, train_flops_per_token  # noqa: E402
from nanoseek.data.tokenizer import Tokenizer  # noqa: E402
from nanoseek.hf import export  # noqa: E402
from nanoseek.peak import gemm_peak  # noqa: E402
from nanoseek.rl.evaluate import prompt_ids  # noqa: E402
from nanoseek.rl.grpo import GRPOConfig  # noqa: E402
from nanoseek import kernels  # noqa: E402
from nanoseek.rl.loop import load_grpo_config, run_grpo, sample_problems  # noqa: E402
from nanoseek.rl.rewards import Rewards  # noqa: E402
from nanoseek.train.optim import build_optimizer, lr_at  # noqa: E402

SETTINGS = {"demo": ([], "runs/nano"), "small": (["max_completion_tokens=256"], "runs/small")}
TRL_LOSS = {"sequence": "grpo", "token": "dapo", "micro_token": "bnpo", "constant": "dr_grpo"}
TRL_SCALE = {"grpo": "group", "dr_grpo": "none"}


def trl_args(cfg: GRPOConfig, out: Path):
    """cfg's settings as a trl.GRPOConfig: one optimizer step per rollout (mu = minibatches = 1, as the
    demo), micro-batches of cfg.micro_batch sequences (gradient accumulation), TRL's loss / scaling names."""
    import trl

    rollout = cfg.prompts_per_step * cfg.group_size
    micro = min(cfg.micro_batch, rollout)
    if cfg.mu != 1 or cfg.minibatches != 1 or rollout % micro:
        raise ValueError("the side-by-side times one optimizer step per rollout: mu=1, minibatches=1, and a "
                         f"micro_batch that divides the {rollout} completions")
    return trl.GRPOConfig(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=rollout // micro, steps_per_generation=rollout // micro,
        num_generations=cfg.group_size, max_completion_length=cfg.max_completion_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, loss_type=TRL_LOSS[cfg.loss_agg],
        scale_rewards=TRL_SCALE[cfg.advantage], beta=cfg.beta, epsilon=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high, num_iterations=cfg.mu, mask_truncated_completions=cfg.mask_truncated,
        max_grad_norm=cfg.optim.grad_clip, learning_rate=cfg.optim.lr, seed=cfg.seed, shuffle_dataset=False,
        use_cpu=cfg.device == "cpu", bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False)


def settings_table(cfg: GRPOConfig, t, threads: int) -> list[tuple[str, object, object]]:
    """(field, nanoseek, TRL), TRL's read back from its config t; "·" marks a field with no counterpart."""
    same = "build_optimizer (AdamW) + lr_at"
    return [
        ("completions per rollout", cfg.prompts_per_step * cfg.group_size, t.generation_batch_size),
        ("group size G", cfg.group_size, t.num_generations),
        ("max completion tokens", cfg.max_completion_tokens, t.max_completion_length),
        ("temperature / top-p / top-k", (cfg.temperature, cfg.top_p, 0), (t.temperature, t.top_p, t.top_k)),
        ("loss", TRL_LOSS[cfg.loss_agg], t.loss_type),
        ("advantage scaling", TRL_SCALE[cfg.advantage], t.scale_rewards),
        ("beta (KL)", cfg.beta, t.beta),
        ("clip eps low / high", (cfg.epsilon_low, cfg.epsilon_high), (t.epsilon, t.epsilon_high)),
        ("passes per rollout (mu)", cfg.mu, t.num_iterations),
        ("optimizer steps per rollout", cfg.minibatches, t.steps_per_generation // t.gradient_accumulation_steps),
        ("sequences per forward", f"<= {min(cfg.micro_batch, t.generation_batch_size)}, by length"
         if cfg.loss_agg != "micro_token" else min(cfg.micro_batch, t.generation_batch_size),
         t.per_device_train_batch_size),
        ("truncated completions masked", cfg.mask_truncated, t.mask_truncated_completions),
        ("max grad norm", cfg.optim.grad_clip, t.max_grad_norm),
        ("optimizer and lr schedule", same, same),
        ("reward", "nanoseek accuracy + format", "nanoseek accuracy + format"),
        ("prompt order", "sample_problems, in order", "shuffled" if t.shuffle_dataset else
         "sample_problems, in order"),
        ("dtype", "fp32", "fp32" if not (t.bf16 or t.fp16) else "bf16/fp16"),
        ("threads", threads, threads),
        ("seed", cfg.seed, t.seed),
        ("max prompt tokens", cfg.max_prompt_tokens, "·"),
        ("sampling seeds", "one per completion", "·"),
        ("a group's prompt run once in the update", "where it pays (rl/packing.py)" if cfg.pack_prompts and
         cfg.loss_agg != "micro_token" else "no", "·"),
    ]


def print_settings(rows) -> None:
    print("| setting | nanoseek | TRL | |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        mark = "·" if "·" in (ours, theirs) else "" if ours == theirs else "≠"
        print(f"| {name} | {ours} | {theirs} | {mark} |")


def run_nanoseek(cfg: GRPOConfig) -> list[dict]:
    run_grpo(cfg, quiet=True)
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    n = cfg.prompts_per_step * cfg.group_size
    return [{"step_s": r["step_time"], "gen_s": r["gen_time"], "tok_s": r["rollout_tok_s"], "reward": r["reward"],
             "tokens": r["rollout_tok_s"] * r["gen_time"], "truncated": round(r["truncated"] * n)}
            for r in records if "reward" in r]


def run_trl(cfg: GRPOConfig, folder: Path, out: Path) -> list[dict]:
    """TRL's GRPOTrainer on the exported folder, the same prompts and reward; timings per optimizer step."""
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    ours = Tokenizer.load(folder)
    problems = [p for step in range(cfg.steps) for p in sample_problems(cfg, step)]
    posed = [prompt_ids(p, ours) for p in problems]
    scorer = Rewards({"accuracy": cfg.accuracy_weight, "format": cfg.format_weight},
                     [f for f in cfg.reward_fns.split(",") if f.strip()])

    def nanoseek_reward(completions, idx, **_):
        return [scorer(problems[i], posed[i][1] + text)["total"] for i, text in zip(idx, completions)]

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [ours.decode(ids) for ids, _ in posed]
    if tok(texts[0])["input_ids"] != posed[0][0]:
        raise RuntimeError("TRL would tokenize the prompts differently from nanoseek")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg.steps, cfg.optim) / cfg.optim.lr)
    clock = {"gen_s": 0.0, "tokens": 0, "truncated": 0}
    steps: list[dict] = []

    class Timed(trl.GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            t = time.perf_counter()
            ids, logprobs = super()._generate_single_turn(*a, **k)
            clock["gen_s"] += time.perf_counter() - t
            clock["tokens"] += sum(map(len, ids))
            clock["truncated"] += sum(len(c) >= cfg.max_completion_tokens for c in ids)
            return ids, logprobs

    class Steps(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.update(t0=time.perf_counter(), gen_s=0.0, tokens=0, truncated=0)

        def on_step_end(self, *_, **__):
            steps.append({"step_s": time.perf_counter() - clock["t0"], "gen_s": clock["gen_s"],
                          "tok_s": clock["tokens"] / max(clock["gen_s"], 1e-9), "tokens": clock["tokens"],
                          "truncated": clock["truncated"]})

    args = trl_args(cfg, out)
    trainer = Timed(model=model, reward_funcs=nanoseek_reward, args=args, processing_class=tok,
                    train_dataset=datasets.Dataset.from_dict({"prompt": texts, "idx": list(range(len(texts)))}),
                    optimizers=(optimizer, schedule), callbacks=[Steps()])
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return [{**s, "reward": r} for s, r in zip(steps, rewards)]


def stage_flops(model: ModelConfig, prompt_tokens: int, generated: float, sequences: int, masked: int = 0,
                max_completion: int = 0) -> tuple[float, float]:
    """Model FLOPs (nanoseek.cost) of a step's two stages, the same formula for both sides: the rollout
    prefills the prompts and decodes the completions (absorbed MLA), the update runs forward + backward over
    the prompt + completion tokens of the sequences that carry loss (padding, and the `masked` truncated
    completions of max_completion tokens with their prompts, are not model work); attention at the mean
    sequence length."""
    S = max(int((prompt_tokens + generated) / sequences), 1)
    gen = (prompt_tokens * inference_flops_per_token(model, S).total
           + generated * inference_flops_per_token(model, S, absorbed=True).total)
    useful = prompt_tokens + generated - masked * (prompt_tokens / sequences + max_completion)
    return gen, train_flops_per_token(model, S).total * max(useful, 0)


def summarize(rounds: list[list[dict]], flops=None) -> dict[str, list[float]]:
    """Per round, the median of steps 2..N (all steps when there is only one) of each figure; flops(step
    index, generated tokens, truncated completions) -> (rollout, update) FLOPs gives each stage's MFU."""
    out: dict[str, list[float]] = {k: [] for k in ("step_s", "gen_s", "share", "tok_s", "update_s", "gen_mfu",
                                                   "update_mfu")}
    for steps in rounds:
        kept = list(enumerate(steps))[1:] or list(enumerate(steps))
        f = [flops(i, s["tokens"], s["truncated"]) for i, s in kept]
        for k, values in (("step_s", [s["step_s"] for _, s in kept]), ("gen_s", [s["gen_s"] for _, s in kept]),
                          ("share", [s["gen_s"] / s["step_s"] for _, s in kept]),
                          ("tok_s", [s["tok_s"] for _, s in kept]),
                          ("update_s", [s["step_s"] - s["gen_s"] for _, s in kept]),
                          ("gen_mfu", [g / s["gen_s"] for (_, s), (g, _) in zip(kept, f)]),
                          ("update_mfu", [u / (s["step_s"] - s["gen_s"]) for (_, s), (_, u) in zip(kept, f)])):
            out[k].append(statistics.median(values))
    return out


def cell(values: list[float], fmt: str) -> str:
    mid = statistics.median(values)
    return f"{mid:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]" if len(values) > 1 else f"{mid:{fmt}}"


def report(results: dict[str, list[list[dict]]], steps: int, flops, peak) -> None:
    """The table (median over rounds [min-max]) and the reward curves; MFU against `peak` (FLOP/s)."""
    mfu = lambda *step: tuple(x / peak.flops for x in flops(*step))  # noqa: E731
    ns, theirs = summarize(results["nanoseek"], mfu), summarize(results["TRL"], mfu)
    print(f"\nmedian of steps 2..{steps} per round; median over {len(results['TRL'])} rounds [min-max]; MFU: "
          f"model FLOPs (`stage_flops`) against the GEMM peak, {peak.rate} ({peak.origin})\n")
    print("| per step | nanoseek | TRL | TRL / nanoseek |\n|---|---:|---:|---:|")
    for key, name, fmt in (("step_s", "seconds", ".2f"), ("gen_s", "generation seconds", ".2f"),
                           ("share", "generation share", ".0%"), ("tok_s", "rollout tokens/s", ",.0f"),
                           ("gen_mfu", "generation MFU", ".1%"), ("update_s", "update seconds", ".2f"),
                           ("update_mfu", "update MFU", ".1%")):
        ratio = statistics.median(theirs[key]) / max(statistics.median(ns[key]), 1e-9)
        print(f"| {name} | {cell(ns[key], fmt)} | {cell(theirs[key], fmt)} | {ratio:.2f}x |")
    print("\nreward per step (mean over rounds): step | nanoseek | TRL")
    for i in range(steps):
        means = [statistics.mean(run[i]["reward"] for run in results[side] if i < len(run)) for side in results]
        print(f"{i + 1} | {means[0]:.3f} | {means[1]:.3f}")


def compare(args, init: Path, work: Path) -> None:
    folder = export(init, work / "hf")
    base = [*SETTINGS[args.setting][0], *args.overrides, f"steps={args.steps}", "eval_problems=0", "device=cpu",
            f"ckpt_every={args.steps}", f"sample_every={args.steps}", f"init={folder}"]
    cfg = load_grpo_config(args.config, base)
    print(f"GRPO: nanoseek vs TRL from {init} ({args.setting}: {cfg.prompts_per_step} x {cfg.group_size}, "
          f"{cfg.max_completion_tokens} tokens; {args.steps} steps x {args.rounds} rounds; {args.threads} threads)\n")
    print_settings(settings_table(cfg, trl_args(cfg, work / "args"), args.threads))
    results: dict[str, list[list[dict]]] = {"nanoseek": [], "TRL": []}
    for r in range(args.rounds):
        results["nanoseek"].append(run_nanoseek(load_grpo_config(args.config, [*base, f"out_dir={work / f'ns{r}'}"])))
        results["TRL"].append(run_trl(cfg, folder, work / f"trl{r}"))
        per_step = {side: statistics.median(s["step_s"] for s in runs[-1]) for side, runs in results.items()}
        print(f"round {r + 1}: s/step " + ", ".join(f"{k} {v:.2f}" for k, v in per_step.items()), flush=True)
    tok = Tokenizer.load(folder)
    model = ModelConfig.from_file(folder / "config.json")
    prompts = [sum(len(prompt_ids(p, tok)[0]) for p in sample_problems(cfg, i)) * cfg.group_size
               for i in range(args.steps)]
    n = cfg.prompts_per_step * cfg.group_size
    masking = cfg.max_completion_tokens if cfg.mask_truncated else 0
    report(results, args.steps, lambda i, generated, truncated: stage_flops(
        model, prompts[i], generated, n, truncated if masking else 0, masking), gemm_peak("cpu", "fp32"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="GRPOConfig fields as key=value")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="demo")
    ap.add_argument("--config", default=str(ROOT / "configs" / "grpo.toml"))
    ap.add_argument("--init", help="the run to start from (default: runs/nano for demo, runs/small for small)")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    print(kernels.start_process(kernels.Settings()) or "glibc's allocator as it was")  # as `nanoseek rl` does
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours to fix
    init = Path(args.init or ROOT / SETTINGS[args.setting][1])
    if not init.exists():
        raise SystemExit(f"no run at {init}: train one first (`nanoseek train --config configs/{init.name}.toml`)")
    work = Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))
    try:
        compare(args, init, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
