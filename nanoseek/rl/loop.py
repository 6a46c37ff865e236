"""`nanoseek rl`: the GRPO loop (DeepSeekMath §4.1; R1 paper §2.2.1) on verifiable tasks.

    for each step:
        P prompts from the task mix (train split, drawn from (seed, step): exact resume needs no data state)
        G completions each from the inference engine (continuous batching on the latent cache; temperature
            T; a seed per completion), scored by the rule-based rewards (accuracy + format + user functions)
        advantages per group; [beta > 0] reference log-probs; [mu > 1 or minibatches > 1] old log-probs
        mu passes over the batch in `minibatches` optimizer steps (micro-batched by length, `plan`; a group's
            shared prompt run once where that pays, rl/packing.py), gradient clipping
        log reward / accuracy / format / length / KL / entropy / clip fractions / rollout tok/s, generation
            and update seconds (gen_time, update_time) / MFU; samples;
        held-out pass@1 every eval_every steps; atomic checkpoints (policy, optimizer, reference, RNG)

Rollouts run on the engine's absorbed-attention path, log-probs on the training path; the old policy's
log-probs are recomputed on the training path (TRL does the same), so the ratio is exactly 1 on-policy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.config import apply_overrides
from nanoseek.cost import inference_flops_per_token, run_compute, train_flops_per_token
from nanoseek.peak import Peak, gemm_peak, honest_peak
from nanoseek.data.tasks import Problem, get_task, make_rng
from nanoseek.data.tokenizer import Tokenizer
from nanoseek import kernels
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.report import compute_rows, plot_rl, write_report
from nanoseek.rl.evaluate import evaluate, prompt_ids
from nanoseek.rl.grpo import GRPOConfig, group_advantages, policy_loss, token_logprobs
from nanoseek.rl.packing import Packed, pays
from nanoseek.rl.rewards import Rewards
from nanoseek.runs import latest_checkpoint, load_tensors
from nanoseek.runtime import MetricsLog, resolve_device
from nanoseek.train.checkpoint import load_checkpoint, save_checkpoint
from nanoseek.train.config import flatten_table, read_toml
from nanoseek.train.loop import resolve_kernels
from nanoseek.train.optim import build_optimizer, lr_at

REFERENCE = "reference.safetensors"


def load_grpo_config(path: str | Path | None, overrides: list[str] = ()) -> GRPOConfig:
    """TOML run file (optional; relative paths as `read_toml` resolves them) + strict `key=value` overrides."""
    return apply_overrides(apply_overrides(GRPOConfig(), flatten_table(read_toml(path, overrides))), list(overrides))


def sample_problems(cfg: GRPOConfig, step: int) -> list[Problem]:
    """The step's prompts: each slot picks a task uniformly; problems are distinct within the step."""
    names = cfg.task_names
    rng = make_rng("grpo", cfg.seed, step)
    picks = [rng.randrange(len(names)) for _ in range(cfg.prompts_per_step)]
    out = []
    for i, name in enumerate(names):
        n = picks.count(i)
        if n:
            out += get_task(name, **cfg.task_options).sample(n, "train", seed=cfg.seed * 1_000_003 + step, difficulty=cfg.difficulty,
                                         unique=True)
    return out


@dataclass
class Rollout:
    ids: torch.Tensor  # (N, S) prompt + completion, right-padded
    mask: torch.Tensor  # (N, S - 1) True where target ids[:, j + 1] is a completion token that gets loss
    texts: list[str]  # what is scored: the prompt's opened think block + the completion
    lengths: list[int]  # completion tokens
    truncated: list[bool]
    prompt_tokens: int
    seq_lengths: list[int]  # prompt + completion tokens per row (ids[n, :seq_lengths[n]] is not padding)


def rollout(engine: Engine, problems: list[Problem], cfg: GRPOConfig, step: int) -> Rollout:
    """G completions per problem, all queued at once (continuous batching); each prompt posed by its task's
    template (`prompt_ids`), each text the opener of the prompt's think block + the completion (what is scored)."""
    tok = engine.tokenizer
    requests, openers = [], []
    for i, p in enumerate(problems):
        ids, opener = prompt_ids(p, tok)
        openers += [opener] * cfg.group_size
        if len(ids) > cfg.max_prompt_tokens:
            raise ValueError(f"a {p.task} prompt has {len(ids)} tokens > max_prompt_tokens={cfg.max_prompt_tokens}")
        for g in range(cfg.group_size):
            seed = (cfg.seed * 1_000_003 + step) * 4096 + i * cfg.group_size + g
            requests.append(engine.add(ids, SamplingParams(max_tokens=cfg.max_completion_tokens,
                                                           temperature=cfg.temperature, top_p=cfg.top_p, seed=seed),
                                       stream=False))
    engine.run()
    truncated = [r.finish_reason == "length" for r in requests]
    ids, mask = pack([r.prompt for r in requests], [r.tokens for r in requests], truncated, tok.eos_id,
                     cfg.mask_truncated)
    return Rollout(ids, mask, [o + r.text for o, r in zip(openers, requests)], [len(r.tokens) for r in requests],
                   truncated, sum(len(r.prompt) for r in requests), [len(r.prompt) + len(r.tokens) for r in requests])


def pack(prompts: list[list[int]], completions: list[list[int]], truncated: list[bool], pad_id: int,
         mask_truncated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + completion ids (N, S) and the loss mask (N, S - 1): True where the target
    ids[:, j + 1] is a completion token (its stop token included), except on truncated completions when
    `mask_truncated`."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    S = max(map(len, seqs))
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), S - 1, dtype=torch.bool)
    for n, (p, seq) in enumerate(zip(prompts, seqs)):
        ids[n, : len(seq)] = torch.tensor(seq)
        if not (truncated[n] and mask_truncated):
            mask[n, len(p) - 1: len(seq) - 1] = True
    return ids, mask


# a micro-batch's fixed cost (its forward + backward's op overhead, smaller GEMMs), in padded tokens' worth of work
MICRO_BATCH_COST = 128


def micro_batches(rows: torch.Tensor, seq_len: torch.Tensor, cfg: GRPOConfig) -> list[tuple[torch.Tensor, int]]:
    """`rows` (indices into the batch) in micro-batches of at most cfg.micro_batch sequences, each with the width
    its ids need (its longest sequence). Sorted by length and cut where the padded tokens, sum over micro-batches
    of (sequences x longest) + MICRO_BATCH_COST each, are least (a DP over the cut points): a long completion
    no longer pads a whole micro-batch of short ones (the demo's batches were ~30% padding). loss_agg=
    "micro_token" depends on which sequences share a micro-batch: there the drawn order, in equal parts."""
    if cfg.loss_agg == "micro_token":
        return [(m, int(seq_len[m].max())) for m in rows.split(cfg.micro_batch)]
    rows = rows[seq_len[rows].argsort(stable=True)]
    lens = seq_len[rows].tolist()
    best, cut = [0.0] + [float("inf")] * len(lens), [0] * (len(lens) + 1)  # best[j]: least cost of rows[:j]
    for j in range(1, len(lens) + 1):
        for i in range(max(0, j - cfg.micro_batch), j):
            cost = best[i] + (j - i) * lens[j - 1] + MICRO_BATCH_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(lens)
    while j:
        out.append((rows[cut[j]:j], lens[j - 1]))
        j = cut[j]
    return out[::-1]


def plan(rows: torch.Tensor, ids: torch.Tensor, seq_len: torch.Tensor, prompt_len: torch.Tensor, cfg: GRPOConfig,
         model_cfg) -> list[tuple[torch.Tensor, int, list[int] | None]]:
    """The update's micro-batches of `rows`: (rows, width, group sizes or None). With cfg.pack_prompts (not for
    micro_token), the rows that share a prompt are a group, run as one packed row where that costs fewer FLOPs
    (rl/packing.py), whole groups per micro-batch, at most cfg.micro_batch sequences (or one group) each, by
    packed length; the other rows as `micro_batches` cuts them."""
    if not cfg.pack_prompts or cfg.loss_agg == "micro_token":
        return [(m, w, None) for m, w in micro_batches(rows, seq_len, cfg)]
    groups: dict[tuple, list[int]] = {}
    for r in rows.tolist():
        p = int(prompt_len[r])
        groups.setdefault((p, *ids[r, :p].tolist()), []).append(r)
    packs, single = [], []
    for (p, *_), g in groups.items():
        if len(g) > 1 and pays(model_cfg, p, [int(seq_len[r]) - p for r in g]):
            packs.append((p + sum(int(seq_len[r]) - p for r in g), g))
        else:
            single += g
    out = [(m, w, None) for m, w in micro_batches(torch.tensor(single, dtype=torch.long, device=rows.device),
                                                  seq_len, cfg)] if single else []
    batch: list[list[int]] = []
    for _, g in sorted(packs, key=lambda x: x[0]) + [(0, [])]:
        if batch and (not g or sum(map(len, batch)) + len(g) > cfg.micro_batch):
            m = torch.tensor([r for b in batch for r in b], device=rows.device)
            out.append((m, int(seq_len[m].max()), [len(b) for b in batch]))
            batch = []
        if g:
            batch.append(g)
    return out


def _forward(model, ids, mask, seq_len, prompt_len, m, w, sizes, entropy=False):
    """token_logprobs of rows m (width w), packed by groups of `sizes` rows when given."""
    packed = Packed.build(ids[m, :w], seq_len[m], prompt_len[m], sizes) if sizes else None
    return token_logprobs(model, ids[m, :w], mask[m, : w - 1], entropy, packed)


def _logprobs(model, ids, mask, seq_len, prompt_len, cfg: GRPOConfig) -> torch.Tensor:
    """token_logprobs (N, S - 1) without autograd, micro-batched as the update's `plan`; rows without a loss token
    stay 0 (nothing reads them)."""
    out = torch.zeros(mask.shape, device=ids.device)
    with torch.no_grad():
        for m, w, sizes in plan(mask.any(dim=1).nonzero()[:, 0], ids, seq_len, prompt_len, cfg, model.config):
            out[m, : w - 1] = _forward(model, ids, mask, seq_len, prompt_len, m, w, sizes)[0]
    return out


def update(model, optimizer, ref, batch: Rollout, adv: torch.Tensor, cfg: GRPOConfig, step: int) -> dict:
    """mu passes over the batch, `minibatches` optimizer steps each; returns the step's training statistics."""
    device = next(model.parameters()).device
    ids, mask, adv = batch.ids.to(device), batch.mask.to(device), adv.to(device)
    seq_len = torch.tensor(batch.seq_lengths, device=device)
    prompt_len = seq_len - torch.tensor(batch.lengths, device=device)
    model.train()
    off_policy = cfg.mu > 1 or cfg.minibatches > 1
    old = _logprobs(model, ids, mask, seq_len, prompt_len, cfg) if off_policy else None
    ref_logp = _logprobs(ref, ids, mask, seq_len, prompt_len, cfg) if ref is not None else None
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    sums = {"loss": 0.0, "entropy": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "grad_norm": 0.0}
    n_tokens = max(int(mask.sum()), 1)
    for epoch in range(cfg.mu):
        order = torch.randperm(len(ids), generator=gen).to(device)
        for mb in order.chunk(cfg.minibatches):
            norm = {"sequences": len(mb), "tokens": int(mask[mb].sum()),
                    "micro_batches": -(-len(mb) // cfg.micro_batch)}
            # a sequence without a loss token (a truncated completion under mask_truncated) adds nothing to the
            # loss, its gradient or the statistics: it is not run (micro_token keeps its micro-batches as drawn)
            live = mb if cfg.loss_agg == "micro_token" else mb[mask[mb].any(dim=1)]
            for micro, w, sizes in plan(live, ids, seq_len, prompt_len, cfg, model.config):
                logp, ent = _forward(model, ids, mask, seq_len, prompt_len, micro, w, sizes, entropy=epoch == 0)
                logp_old = old[micro, : w - 1] if old is not None else logp.detach()
                loss, stats = policy_loss(logp, logp_old, adv[micro], mask[micro, : w - 1], cfg, norm,
                                          None if ref_logp is None else ref_logp[micro, : w - 1])
                loss.backward()
                sums["loss"] += float(loss.detach()) / (cfg.mu * cfg.minibatches)
                for k, v in stats.items():
                    sums[k] += float(v) / (n_tokens * cfg.mu)
                if epoch == 0:
                    sums["entropy"] += float(ent.sum()) / n_tokens
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf))
            if math.isfinite(grad_norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] += grad_norm / (cfg.mu * cfg.minibatches)
    return sums


def heldout_eval(model, tok, cfg: GRPOConfig) -> dict:
    """Greedy accuracy and pass@1 over eval_k samples (T 0.6, top-p 0.95) on the tasks' held-out problems."""
    per_task = max(cfg.eval_problems // len(cfg.task_names), 1)
    problems = [p for name in cfg.task_names for p in get_task(name, **cfg.task_options).sample(
        per_task, "heldout", seed=cfg.seed, difficulty=cfg.difficulty, unique=True)]
    overall = evaluate(model, tok, problems, k=cfg.eval_k, max_tokens=cfg.max_completion_tokens, seed=cfg.seed,
                       batch_size=256, progress=False)["overall"]
    return {k: overall[k] for k in ("greedy", "pass@1", f"maj@{cfg.eval_k}", f"pass@{cfg.eval_k}") if k in overall}


def _flops(cfg: GRPOConfig, model_cfg, batch: Rollout, ref: bool) -> float:
    """Model FLOPs of one step: prefill + absorbed decode for the rollouts, forward + backward per update
    pass over the real tokens of the sequences it runs (padding and sequences without a loss token are not model
    work; a packed group's prompt counts once), and the forward-only passes for old / reference log-probs."""
    S = batch.ids.shape[1]
    gen_tokens = sum(batch.lengths)
    roll = (batch.prompt_tokens * inference_flops_per_token(model_cfg, S).total
            + gen_tokens * inference_flops_per_token(model_cfg, S, absorbed=True).total)
    seq_len = torch.tensor(batch.seq_lengths)
    prompt_len = seq_len - torch.tensor(batch.lengths)
    rows = torch.arange(len(seq_len)) if cfg.loss_agg == "micro_token" else batch.mask.any(dim=1).nonzero()[:, 0]
    tokens = 0  # the update skips sequences without a loss token (but for micro_token)
    for m, _, sizes in plan(rows, batch.ids, seq_len, prompt_len, cfg, model_cfg):
        tokens += int(seq_len[m].sum())
        start = 0
        for n in sizes or []:  # a packed group of n sequences runs its prompt once
            tokens -= (n - 1) * int(prompt_len[m[start]])
            start += n
    train = train_flops_per_token(model_cfg, S).total * tokens
    forwards = (cfg.mu > 1 or cfg.minibatches > 1) + ref
    return roll + train * (cfg.mu + forwards / 3)


@dataclass
class GRPOResult:
    """A finished GRPO run: what `run_grpo` returns, and what `run` adds (report.md's sections and path)."""
    model: Transformer  # the policy after the last step
    tokenizer: Tokenizer
    last: dict  # the last step record ({} if no step ran)
    elapsed: float  # seconds of training, resumed parts included
    flops: float  # model FLOPs of all steps (`_flops`)
    peak: Peak  # the GEMM peak that MFU is measured against, and where it came from
    sections: dict[str, dict] = field(default_factory=dict)
    report: Path | None = None


def run_grpo(cfg: GRPOConfig, resume: bool = False, quiet: bool = False) -> GRPOResult:
    run = Path(cfg.out_dir)
    ckpt = latest_checkpoint(run)
    if ckpt is not None and not resume:
        raise ValueError(f"{run} already holds a run (last checkpoint {ckpt.name}); pass --resume to continue it, "
                         f"or choose another out_dir")
    device = resolve_device(cfg.device)
    pre = load_pretrained(cfg.init, device=device, dtype=torch.float32, needs_tokenizer="RL (to build prompts)")
    model, tok = pre.model, pre.tokenizer
    rewards = Rewards({"accuracy": cfg.accuracy_weight, "format": cfg.format_weight},
                      [f for f in cfg.reward_fns.split(",") if f.strip()])
    cfg = dataclasses.replace(cfg, kernels=kernels.apply(model, resolve_kernels(cfg.kernels, ckpt)))
    torch.manual_seed(cfg.seed)
    model.mtp.requires_grad_(False)  # RL trains the main model only; MTP keeps drafting from its pretraining
    optimizer = build_optimizer(model, cfg.optim)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    start, elapsed, total_flops = 0, 0.0, 0.0
    run.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        if state["config"] != cfg.to_dict():
            diff = [k for k, v in cfg.to_dict().items() if state["config"].get(k) != v]
            raise ValueError(f"{ckpt}: the checkpoint's run differs from this config in {diff}")
        start, elapsed, total_flops = state["step"], state["elapsed"], state["flops"]
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        if ref is not None:
            ref.load_hf_state_dict(load_tensors(ckpt / REFERENCE))
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "grpo": cfg.to_dict()}, indent=2))
    tok.save(run)
    log = MetricsLog(run / "metrics.jsonl", keep_until=start if ckpt is not None else None)
    samples = MetricsLog(run / "samples.jsonl", keep_until=start if ckpt is not None else None)
    peak = gemm_peak(str(device))  # fp32: RL trains without autocast
    engine = Engine(model, tok, max_batch=min(cfg.prompts_per_step * cfg.group_size, 256),
                    max_len=cfg.max_prompt_tokens + cfg.max_completion_tokens)
    if start == 0 and cfg.eval_problems:
        log.write({"step": 0, "eval": heldout_eval(model, tok, cfg)})
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="grpo", unit="step", disable=quiet,
               dynamic_ncols=True)
    if not quiet:
        bar.write(f"MFU against the GEMM peak {peak}")
    record: dict = {}
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if ref is not None and cfg.ref_reset_every and step and step % cfg.ref_reset_every == 0:
            ref.load_state_dict(model.state_dict())
        problems = sample_problems(cfg, step)
        model.eval()
        t_gen = time.perf_counter()
        batch = rollout(engine, problems, cfg, step)
        t_gen = time.perf_counter() - t_gen
        G = cfg.group_size
        scores = [rewards(problems[n // G], text) for n, text in enumerate(batch.texts)]
        r = torch.tensor([s["total"] for s in scores]).view(-1, G)
        adv = group_advantages(r, scale=cfg.advantage == "grpo").flatten()
        t_update = time.perf_counter()
        stats = update(model, optimizer, ref, batch, adv, cfg, step)
        t_update = time.perf_counter() - t_update
        step_time = time.perf_counter() - t0
        elapsed += step_time
        flops = _flops(cfg, model.config, batch, ref is not None)
        total_flops += flops
        peak = honest_peak(peak, flops / step_time)  # measured again where the MFU would exceed 100%
        done = step + 1
        gen = sum(batch.lengths)
        record = {"step": done, "reward": round(float(r.mean()), 4), "reward_std": round(float(r.std()), 4),
                  **{k: round(sum(s[k] for s in scores) / len(scores), 4) for k in rewards.names},
                  "frac_zero_std": round(float((r.std(dim=1) == 0).float().mean()), 4),
                  "len": round(gen / len(batch.lengths), 2), "len_max": max(batch.lengths),
                  "truncated": round(sum(batch.truncated) / len(batch.truncated), 4),
                  **{k: round(v, 6) for k, v in stats.items()}, "lr": lr,
                  "rollout_tok_s": round(gen / t_gen, 1), "gen_time": round(t_gen, 3),
                  "update_time": round(t_update, 3), "step_time": round(step_time, 2),
                  "mfu": round(flops / step_time / peak.flops, 4), "elapsed": round(elapsed, 2)}
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.write(record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record.get('accuracy', 0):.2f}",
                            len=f"{record['len']:.0f}", mfu=f"{record['mfu']:.1%} of {peak.rate} {peak.origin}")
            if not quiet:
                bar.write(f"{done}/{cfg.steps} | reward {record['reward']:.3f} | reward_std {record['reward_std']:.3f}"
                          f" | frac_zero_std {record['frac_zero_std']:.2f} | len {record['len']:.1f}"
                          f" | kl {record['kl']:.4f} | rollout tok/s {record['rollout_tok_s']:,.0f}"
                          f" | mfu {record['mfu']:.1%}")
        if done % cfg.sample_every == 0 or done == cfg.steps:
            for n in range(0, len(batch.texts), G):  # one completion per prompt
                samples.write({"step": done, "prompt": problems[n // G].prompt, "answer": problems[n // G].answer,
                               "completion": batch.texts[n], "reward": scores[n]["total"],
                               "advantage": round(float(adv[n]), 4)})
        if cfg.eval_problems and (done % cfg.eval_every == 0 or done == cfg.steps):
            ev = heldout_eval(model, tok, cfg)
            log.write({"step": done, "eval": ev})
            if not quiet:
                bar.write(f"{done}/{cfg.steps} | held-out " + " | ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            state = {"rng": torch.get_rng_state().tolist(), "elapsed": elapsed, "flops": total_flops,
                     "config": cfg.to_dict(), "finished": done == cfg.steps}
            extra = {REFERENCE: {k: v.detach().contiguous().clone() for k, v in
                                 ref.hf_state_dict(mtp_copies=False).items()}} if ref is not None else None
            save_checkpoint(run, done, model, optimizer, state, cfg.keep_last, extra)
    bar.close()
    log.close()
    samples.close()
    return GRPOResult(model, tok, record, elapsed, total_flops, peak)


def run(cfg: GRPOConfig, resume: bool = False, quiet: bool = False) -> GRPOResult:
    """GRPO, plots and report.md: what `nanoseek rl` does."""
    result = run_grpo(cfg, resume=resume, quiet=quiet)
    run_dir = Path(cfg.out_dir)
    plot_rl(run_dir)
    evals = [json.loads(line)["eval"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    result.sections = {
        "Run": {"policy": f"init {cfg.init}", "tasks": cfg.tasks, "steps": cfg.steps,
                "prompts x group": f"{cfg.prompts_per_step} x {cfg.group_size}",
                "algorithm": f"advantage {cfg.advantage}, loss {cfg.loss_agg}, eps [{cfg.epsilon_low}, "
                             f"{cfg.epsilon_high}], beta {cfg.beta}, mu {cfg.mu}",
                "final reward": result.last.get("reward"), "wall time": f"{result.elapsed:.0f} s"},
        "Held-out (before -> after)": {k: f"{evals[0][k]:.3f} -> {evals[-1][k]:.3f}" for k in evals[0]}
        if len(evals) > 1 else {},
        "Compute": compute_rows(run_compute(1.0, result.flops, result.elapsed, price_per_hour=cfg.price_per_hour,
                                            peak=honest_peak(result.peak, result.flops / max(result.elapsed, 1e-9)))),
        "Use it": {"chat": f"`nanoseek chat {cfg.out_dir}`", "serve": f"`nanoseek serve {cfg.out_dir}`"},
    }
    result.report = write_report(run_dir, result.sections)
    return result
