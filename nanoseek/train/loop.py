"""The pretraining loop: V3's losses, AdamW, auxiliary-loss-free balancing, validation, checkpoints.

Per optimizer step (DeepSeek-V3 report §2.1.2, §2.2, §4.2):
    L = L_main + lambda * (1/D) sum_k L_MTP^k + alpha * sum_layers L_Bal       (averaged over micro-batches)
    clip ||grad|| to 1.0;  AdamW step;  then for every MoE layer, from the step's token counts c:
    b_i <- b_i + gamma * sign(mean(c) - c_i)                                    (the bias is not a parameter)
Logged per step: loss terms, lr, grad norm, tokens/s, MFU, expert load MaxVio = max(c) / mean(c) - 1.
Left out: V3's batch-size ramp, FIM, document masking (V3 packs documents without cross-document masks too).
Under torchrun the same loop runs data and expert parallel (nanoseek/parallel): batch_size is the global batch,
each rank reads its slice, token counts for the bias update are summed over all ranks, and rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoseek.cost import run_compute, train_flops_per_token
from nanoseek.peak import Peak, gemm_peak, honest_peak
from nanoseek.data.builtin import ensure_builtin_data, get_mix
from nanoseek.data.loader import TokenLoader
from nanoseek.data.shards import ShardSet
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.parallel import checkpoint as dist_checkpoint
from nanoseek.parallel.parallelize import (Parallel, all_reduce_mean, clip_grad_norm, close,
                                    collective_failure, failed_collective, init_parallel, launched,
                                    loss_weights, parallelize)
from nanoseek.hf import load_pretrained, locate
from nanoseek import kernels
from nanoseek.model import Transformer
from nanoseek.model.fp8_linear import Recipe, to_fp8
from nanoseek.report import compute_rows, plot_training, read_metrics, write_report
from nanoseek.runs import CheckpointError, latest_checkpoint, read_state
from nanoseek.runtime import MetricsLog, resolve_device
from nanoseek.train.checkpoint import load_checkpoint, save_checkpoint
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer, lr_at


def uses_bf16(device: torch.device, dtype: str) -> bool:
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast where the device computes it fast (CUDA with bf16); fp32 otherwise (auto)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, dtype) else nullcontext()


def v3_loss(out, mtp_lambda: float, alpha: float, weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The terms of L from a forward with labels: main, mtp (mean over depths), balance (sum over layers).
    weights: factors of the main loss and each MTP depth (a rank's share of the global batch's targets)."""
    w = weights or [1.0] * (1 + len(out.mtp_losses))  # x * 1.0 is x exactly
    terms = {"main": out.loss * w[0]}
    loss = terms["main"]
    if out.mtp_losses:
        terms["mtp"] = torch.stack([m * f for m, f in zip(out.mtp_losses, w[1:])]).mean()
        loss = loss + mtp_lambda * terms["mtp"]
    balance = [r.balance_loss for r in out.router if r.balance_loss is not None]
    if balance:
        terms["balance"] = torch.stack(balance).sum()
        loss = loss + alpha * terms["balance"]
    terms["loss"] = loss
    return terms


@torch.no_grad()
def update_router_biases(model: Transformer, counts: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean(c) - c_i), per MoE layer (counts (n, e))."""
    if gamma == 0:
        return
    for moe, c in zip(model.moe_layers(), counts.float()):
        bias = getattr(moe.gate, "e_score_correction_bias", None)
        if bias is not None:
            bias += gamma * torch.sign(c.mean() - c)


def max_violation(counts: torch.Tensor) -> list[float]:
    """MaxVio per MoE layer: max_i c_i / mean(c) - 1 (0 = perfectly balanced)."""
    c = counts.float()
    return (c.amax(dim=-1) / c.mean(dim=-1).clamp_min(1e-9) - 1).tolist()


@torch.no_grad()
def evaluate(model: Transformer, loader: TokenLoader, batches: int, device, ctx, par: Parallel | None = None
             ) -> float:
    """Mean over validation batches of the batch's token-mean loss. Distributed: a batch is the union of the
    ranks' slices (the single-process batch); a rank out of windows runs a batch without targets, since
    every forward is collective."""
    model.eval()
    total = 0.0
    n = 0
    batches = loader.val_batches(batches)
    while True:
        batch = next(batches, None)
        if par is not None:
            more = torch.tensor([float(batch is not None)], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                break
            if batch is None:
                batch = (torch.zeros(1, loader.seq_len, dtype=torch.long),
                         torch.full((1, loader.seq_len), -100, dtype=torch.long))
        elif batch is None:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        with ctx:
            loss = model(x, mtp=False, labels=y).loss
        if par is not None:
            pair = torch.stack([loss.float() * (y != -100).sum(), (y != -100).sum().float()])
            dist.all_reduce(pair)
            loss = pair[0] / pair[1].clamp_min(1)
        total += float(loss)
        n += 1
    model.train()
    return total / n if n else float("nan")  # a val split shorter than one sequence has no loss


class _NoLog:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class TrainResult:
    """A finished run: what `train` returns, and what `run` adds for report.md (config, tokenizer, sections)."""
    model: Transformer | None  # the final weights in one process's model (kernels applied); None off rank 0
    last: dict  # the last step record of metrics.jsonl ({} if no step ran)
    elapsed: float  # seconds of training, resumed parts included
    flops_per_token: float  # training, with MTP
    peak: Peak  # the GEMM peak per device that MFU is measured against (rank 0), and where it came from
    rank: int = 0
    world: int = 1
    config: TrainConfig | None = None  # the config as trained (vocabulary from the tokenizer, kernels resolved)
    tokenizer: Tokenizer | None = None
    sections: dict[str, dict] = field(default_factory=dict)  # run(): report.md's tables
    report: Path | None = None


def train(cfg: TrainConfig, shard_dir: Path, resume: bool = False, quiet: bool = False, init=None) -> TrainResult:
    """Run (or resume) the loop to cfg.steps. `init(model)`, if given, edits the freshly initialized model
    (before any checkpoint is loaded). Under torchrun every rank calls this; rank 0's result holds the model
    (plain, final weights), the others' None."""
    if not launched():
        if cfg.ep > 1:
            raise ValueError(f"ep={cfg.ep} needs several processes: torchrun --nproc_per_node N -m nanoseek "
                             f"train ... with N a multiple of {cfg.ep}")
        return _train(cfg, shard_dir, resume, quiet, init, None)
    par = init_parallel(cfg.ep, cfg.dist_timeout, cfg.device, cfg.batch_size)
    try:
        return _train(cfg, shard_dir, resume, quiet or par.rank != 0, init, par)
    except RuntimeError as e:
        if failed_collective(e):
            raise collective_failure(par, e) from e
        raise
    finally:
        close(par)


def _train(cfg: TrainConfig, shard_dir: Path, resume: bool, quiet: bool, init, par: Parallel | None
           ) -> TrainResult:
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = par.device if par else resolve_device(cfg.device)
    rank, world = (par.rank, par.world) if par else (0, 1)
    ctx = autocast_for(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).to(device).train()  # the same weights on every rank (same seed)
    if cfg.precision == "fp8":  # same parameters; the linear layers' and experts' GEMMs run in FP8
        to_fp8(model, Recipe(scale_fmt=cfg.fp8_scale_fmt))
    if init is None and cfg.init:
        init = functools.partial(_init_from, cfg.init)
    if init is not None:
        init(model)
    cfg = dataclasses.replace(cfg, kernels=kernels.apply(model, resolve_kernels(cfg.kernels, latest_checkpoint(run) if resume else None, par)))
    if par:
        parallelize(model, par, bf16=uses_bf16(device, cfg.dtype))
    optimizer = build_optimizer(model, cfg.optim)
    loader = TokenLoader(shard_dir, "train", cfg.batch_size // world, cfg.data.seq_len, seed=cfg.seed,
                         rank=rank, world_size=world, loss_on=cfg.data.loss_on)
    val_loader = TokenLoader(shard_dir, "val", cfg.batch_size // world, cfg.data.seq_len, seed=cfg.seed,
                             rank=rank, world_size=world, loss_on=cfg.data.loss_on)
    start, elapsed = 0, 0.0
    ckpt = latest_checkpoint(run)
    if ckpt is not None and not resume:
        raise ValueError(f"{run} already holds a run (last checkpoint {ckpt.name}); pass --resume to continue it, "
                         f"or choose another out_dir")
    if ckpt is not None:
        if par or (ckpt / "dcp").is_dir():  # sharded, or loaded at another world size
            state = dist_checkpoint.load(ckpt, model, optimizer, par)
        else:
            state = load_checkpoint(ckpt, model, optimizer)
        if state["config"]["model"] != cfg.model.to_dict():
            diff = [k for k, v in cfg.model.to_dict().items() if state["config"]["model"].get(k) != v]
            raise CheckpointError(f"{ckpt / 'state.json'}: the checkpoint's model differs from the run's in {diff}")
        start, elapsed = state["step"], state["elapsed"]
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    if rank == 0:
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        ShardSet.open(shard_dir).tokenizer().save(run)  # the run directory is all that inference needs
    log = MetricsLog(run / "metrics.jsonl", keep_until=start if ckpt is not None else None) if rank == 0 \
        else _NoLog()
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len, mtp=True).total
    peak = gemm_peak(str(device), "bf16" if uses_bf16(device, cfg.dtype) else "fp32") if rank == 0 \
        else Peak(math.nan, "measured on rank 0", "")  # MFU is logged by rank 0
    n_moe = len(model.moe_layers())
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", unit="step",
               disable=quiet, dynamic_ncols=True)
    if not quiet:
        bar.write(f"MFU against the GEMM peak {peak}")
    window_time, window_tokens, record = 0.0, 0, {}
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = cfg.mtp_weight(step)
        counts = torch.zeros(n_moe, cfg.model.n_routed_experts, dtype=torch.long, device=device)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if par:  # reduce gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with ctx:
                out = model(x, mtp=lam > 0, labels=y)
            weights = loss_weights(y, len(out.mtp_losses), world) if par else None
            terms = v3_loss(out, lam, cfg.balance_alpha, weights)
            (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            for i, r in enumerate(out.router):  # MTP layers report nothing on steps where lambda = 0
                counts[i] += r.tokens_per_expert
        if par:  # global token counts and loss terms; the same bias update on every rank
            dist.all_reduce(counts)
            sums = all_reduce_mean(sums, device)
            grad_norm = clip_grad_norm(model, cfg.optim.grad_clip or float("inf"))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf")))
        finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            update_router_biases(model, counts, cfg.gamma(step))
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0
        elapsed += step_time
        window_time += step_time
        window_tokens += cfg.tokens_per_step
        done = step + 1
        last = done == cfg.steps or 0 < cfg.time_limit <= elapsed  # a time-limited run ends here
        if par and cfg.time_limit > 0:  # rank 0's clock decides for all, or the ranks would part ways
            flag = torch.tensor([float(last)], device=device)
            dist.broadcast(flag, src=0)
            last = bool(flag.item())
        if done % cfg.log_every == 0 or last or not finite:
            tok_s = window_tokens / window_time
            window_time, window_tokens = 0.0, 0
            achieved = flops_per_token * tok_s / world  # FLOP/s per device
            peak = honest_peak(peak, achieved)  # measured again where the MFU would exceed 100%
            record = {"step": done, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr,
                      "grad_norm": round(grad_norm, 4), "tok_s": round(tok_s, 1),
                      "mfu": round(achieved / peak.flops, 4), "max_vio": [round(v, 4) for v in
                      max_violation(counts)] if n_moe else [], "tokens": done * cfg.tokens_per_step,
                      "elapsed": round(elapsed, 2), "skipped": not finite}
            log.write(record)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{record['mfu']:.1%} of {peak.rate} {peak.origin}")
            if not quiet:
                bar.write(f"{done}/{cfg.steps} | loss {sums['loss']:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f}"
                          f" | tok/s {tok_s:,.0f} | mfu {record['mfu']:.1%}")
        if done % cfg.eval_every == 0 or last:
            val = evaluate(model, val_loader, cfg.eval_batches, device, ctx, par)
            log.write({"step": done, "val_loss": round(val, 6)})
            if not quiet:
                bar.write(f"{done}/{cfg.steps} | val_loss {val:.4f}")
        if done % cfg.ckpt_every == 0 or last:
            state = {"loader": loader.state_dict(), "rng": torch.get_rng_state().tolist(), "elapsed": elapsed,
                     "config": cfg.to_dict(), "finished": last}
            if par:
                dist_checkpoint.save(run, done, model, optimizer, state, cfg.keep_last, par)
            else:
                save_checkpoint(run, done, model, optimizer, state, cfg.keep_last)
        if last:
            break
    bar.close()
    log.close()
    if par:  # the final weights as one plain model (what inference and evaluation take), on rank 0
        model = load_pretrained(latest_checkpoint(run), device=device).model.train() if rank == 0 else None
    return TrainResult(model, record, elapsed, flops_per_token, peak, rank, world, config=cfg)


def resolve_kernels(settings: kernels.Settings, ckpt: Path | None, par: Parallel | None = None
                    ) -> kernels.Settings:
    """The run's kernel settings with "auto" resolved: a resumed run (from checkpoint `ckpt`) takes the library
    its config recorded; under torchrun every rank takes rank 0's."""
    recorded = read_state(ckpt)["config"].get("kernels") if ckpt is not None else None
    if par is None:
        return kernels.resolve(settings, recorded)
    choice = [kernels.resolve(settings, recorded) if par.rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


@torch.no_grad()
def _init_from(path: str, model: Transformer) -> None:
    """Copy the weights of a run / checkpoint / HF directory into the fresh model (same architecture)."""
    source = load_pretrained(path).model
    if source.config != model.config:
        diff = [k for k, v in model.config.to_dict().items() if source.config.to_dict().get(k) != v]
        raise ValueError(f"init={path}: its model differs from this run's in {diff}")
    model.load_state_dict(source.state_dict())


def resolve_data(cfg: TrainConfig, progress: bool = False) -> tuple[TrainConfig, Path, Tokenizer]:
    """The shard directory (built-in corpus when data.path is empty) and its tokenizer; the model's vocabulary
    and special ids follow the tokenizer (vocab_size rounded up to a multiple of 64)."""
    if cfg.data.path:
        shard_dir = Path(cfg.data.path)
    else:
        shard_dir = ensure_builtin_data(Path(cfg.data.builtin_dir), vocab_size=cfg.data.builtin_vocab_size,
                                        seed=cfg.data.builtin_seed, n_train_docs=cfg.data.builtin_docs,
                                        p_err=cfg.data.builtin_p_err, mix=get_mix(cfg.data.builtin_mix),
                                        progress=progress)
    shards = ShardSet.open(shard_dir)
    tok = shards.tokenizer()
    if cfg.init:  # the architecture is the init model's; its tokenizer must be the data's
        run, _, model = locate(cfg.init)
        if (run / "tokenizer.json").is_file() and Tokenizer.load(run).sha256 != tok.sha256:
            raise ValueError(f"init={cfg.init} was trained with another tokenizer than the data in {shard_dir}")
    else:
        vocab = -(-tok.vocab_size // 64) * 64
        model = cfg.model.replace(vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    shards.check_vocab(model.vocab_size)
    return dataclasses.replace(cfg, model=model), shard_dir, tok


def run(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Data, training, plots and report.md: what `nanoseek train` does before any evaluation. Under
    torchrun only rank 0 reports (the others return their result after training)."""
    quiet = quiet or int(os.environ.get("RANK", "0")) != 0
    cfg, shard_dir, tok = resolve_data(cfg, progress=not quiet)
    result = train(cfg, shard_dir, resume=resume, quiet=quiet)
    if result.rank != 0:
        return result
    run_dir = Path(cfg.out_dir)
    plot_training(run_dir)
    last = result.last
    tokens = last.get("tokens", cfg.steps * cfg.tokens_per_step)
    device = resolve_device(cfg.device)
    _, evals = read_metrics(run_dir)
    peak = honest_peak(result.peak, result.flops_per_token * tokens / max(result.elapsed, 1e-9) / result.world)
    result.sections = {
        "Run": {"model": f"{cfg.preset}: {cfg.model.summary()}", "data": str(shard_dir),
                "steps": f"{last.get('step', cfg.steps)} x {cfg.tokens_per_step:,} tokens", "tokens": f"{tokens:,}",
                "final train loss": last.get("loss"), "final validation loss": evals[-1]["val_loss"] if evals else None,
                "wall time": f"{result.elapsed:.0f} s", "kernels": kernels.describe(result.config.kernels)},
        "Compute": {"FLOPs per token (training, with MTP)": f"{result.flops_per_token / 1e6:.1f} MFLOP",
                    "device": f"{result.world} x {device}" if result.world > 1 else str(device),
                    **compute_rows(run_compute(result.flops_per_token, tokens, result.elapsed, result.world,
                                               cfg.price_per_hour, peak))},
    }
    result.report = write_report(run_dir, result.sections)
    result.tokenizer = tok
    return result
