"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, same config, weights, batch, loop.

    python bench/train_throughput.py --preset small --batch 8 --seq 512 --steps 6
    python bench/train_throughput.py --sweep              # the V3 shapes of `SWEEP` against transformers
    python bench/train_throughput.py --sweep --quick      # smoke run: the shapes scaled down, 2 timed steps
    flags: --device cuda, --threads N, --no-memory, --gemm auto|blas|onednn, --no-keep-freed-memory

Both run one AdamW step per iteration on the same random tokens (fp32 on CPU, bf16 autocast on CUDA),
interleaved A B A B so machine drift hits both; the median step time after warm-up is reported.
Baselines: transformers with its defaults (experts_implementation="grouped_mm", attn_implementation="sdpa")
and with per-expert loops (experts_implementation="eager"). MTP is off (transformers has none); the
nanoseek row "+MTP" shows the cost of the V3 MTP module on top. MFU uses `nanoseek.cost`'s formula and
its GEMM peak (`gemm_peak`: the machine's best clean measurement, cached; the datasheet's on a GPU).
Peak memory is measured per framework in a fresh subprocess (VmHWM; on a GPU max_memory_allocated).
`--threads N` sets the torch thread count. nanoseek runs as `nanoseek train` does: its kernels applied
(`kernels.apply`, the GEMM library from `--gemm`, resolved once and passed to the memory subprocesses), and
glibc set to keep freed memory at start-up (`kernels.keep_freed_memory`, as the training commands do; for the
whole process, so for transformers too; `--no-keep-freed-memory` leaves glibc as it is).
`--sweep` runs every shape of `SWEEP` (vocab 4k-64k, hidden 256-1024, 8-64 routed experts with top-k 2-8,
sequence 256-1024, with and without q-LoRA, one dense-only) against transformers' defaults only, and
prints per shape the tok/s of each (median, min-max over repeats), their ratio per repeat (median, min-max),
MFU and peak memory, then the minimum ratio. tests/train/test_sweep_shapes.py steps every shape, scaled
down, in both frameworks and checks that their losses agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer, kernels
from nanoseek.cost import train_flops_per_token
from nanoseek.kernels.gemm import rates
from nanoseek.peak import chip, gemm_peak
from nanoseek.train.loop import v3_loss


def make_hf(cfg: ModelConfig, experts: str, ours: Transformer):
    import transformers

    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    model = transformers.DeepseekV3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa",
                                                           experts_implementation=experts)
    model.load_state_dict(_fused(ours), strict=True)
    return model.train()


def _fused(ours: Transformer) -> dict:
    """Our weights (no MTP) under transformers-5 names: the same stacked experts, a `model.` prefix."""
    return {k if k == "lm_head.weight" else f"model.{k}": v.clone() for k, v in ours.state_dict().items()}


def step_fn(model, is_hf: bool, x, y, ctx):
    """One optimizer step. nanoseek runs its training path (`v3_loss` on a forward with labels: chunked
    head cross-entropy, balance loss, MTP if present); transformers its logits + fp32 cross-entropy."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=x.device.type in ("cpu", "cuda"))

    def step():
        """One step; returns its next-token loss (detached)."""
        with ctx:
            if is_hf:
                logits = model(input_ids=x).logits
                loss = main = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                terms = v3_loss(model(x, labels=y), mtp_lambda=0.3, alpha=1e-4)
                loss, main = terms["loss"], terms["main"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        return main.detach()
    return step


def build(kind: str, cfg: ModelConfig, device, settings: kernels.Settings):
    torch.manual_seed(0)
    mtp = kind == "ours+mtp"
    ours = Transformer(cfg.replace(num_nextn_predict_layers=1 if mtp else 0)).to(device).train()
    if kind.startswith("hf"):
        return make_hf(cfg, "grouped_mm" if kind == "hf" else "eager", ours.cpu()).to(device)
    kernels.apply(ours, settings)
    return ours


def peak_memory_self(device) -> float:
    """This process's peak memory in MiB: on a GPU max_memory_allocated; on CPU VmHWM (ru_maxrss survives fork +
    exec on Linux, so a child started by a big parent would report the parent's peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(kind: str, args) -> float:
    """Peak memory (MiB) of a fresh process doing 3 steps of `kind` only, at the shape and device of `args`."""
    shape = ["--shape", args.shape] + ["--quick"] * args.quick if args.shape else \
        ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq)]
    argv = [*shape, "--steps", "3", "--only", kind, "--device", args.device]
    argv += ["--threads", str(args.threads)] * bool(args.threads) + ["--gemm", args.settings.gemm]
    argv += ["--no-keep-freed-memory"] * (not args.settings.keep_freed_memory)
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def interleaved(steps: dict, reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per step of each of `steps`, `reps` rounds run A B A B ... after `warmup` untimed rounds (three:
    oneDNN's first products create their kernels, and the first steps fault their memory in)."""
    times = {k: [] for k in steps}
    for i in range(warmup + reps):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


# name -> (changes to the `small` preset, batch, seq). Head dims stay the preset's (q/k 64 + 32, v 64, 8 heads
# unless changed); n_group 4 / topk_group 2 unless changed; every shape but the dense one has 1 dense layer.
SWEEP = {
    "v4k-h256-e8k2": (dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                           num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, n_routed_experts=8,
                           num_experts_per_tok=2), 8, 256),
    "v8k-h256-e16k4-noq": (dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                                moe_intermediate_size=128, q_lora_rank=None, kv_lora_rank=64, n_routed_experts=16),
                           4, 512),
    "v16k-h384-e32k4": (dict(vocab_size=16384, hidden_size=384, intermediate_size=1024, moe_intermediate_size=192,
                             num_attention_heads=6, q_lora_rank=192), 4, 512),
    "small": ({}, 4, 512),  # v32k-h512-e32k4, the preset itself
    "v32k-h512-e64k8-noq": (dict(q_lora_rank=None, moe_intermediate_size=128, n_routed_experts=64,
                                 num_experts_per_tok=8, n_group=8, topk_group=4), 8, 256),
    "v64k-h512-e16k2": (dict(vocab_size=65536, n_routed_experts=16, num_experts_per_tok=2), 2, 1024),
    "v48k-h768-e32k6": (dict(vocab_size=49152, hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                             q_lora_rank=384, kv_lora_rank=192, num_experts_per_tok=6, num_hidden_layers=4), 2, 512),
    "v16k-h1024-e64k8": (dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                              q_lora_rank=512, kv_lora_rank=256, n_routed_experts=64, num_experts_per_tok=8,
                              n_group=8, topk_group=4, num_hidden_layers=3), 2, 512),
    "v32k-h512-dense": (dict(first_k_dense_replace=6), 2, 1024),  # dense-only: all 6 layers
}


def sweep_shape(name: str, quick: bool = False) -> tuple[ModelConfig, int, int]:
    """(config, batch, seq) of a `SWEEP` shape; `quick` scales it down (2 layers, widths / 8, vocab / 32, kv
    rank / 4, batch 2 x seq 64) and keeps what makes it that shape: q-LoRA or not, experts and top-k, groups,
    dense-only."""
    changes, batch, seq = SWEEP[name]
    cfg = ModelConfig.preset("small", num_nextn_predict_layers=0, **changes)
    if not quick:
        return cfg, batch, seq
    dense, c = cfg.first_k_dense_replace >= cfg.num_hidden_layers, cfg
    return c.replace(vocab_size=c.vocab_size // 32, hidden_size=c.hidden_size // 8,
                     intermediate_size=c.intermediate_size // 8, moe_intermediate_size=c.moe_intermediate_size // 8,
                     q_lora_rank=c.q_lora_rank and c.q_lora_rank // 8, kv_lora_rank=c.kv_lora_rank // 4,
                     num_hidden_layers=2, first_k_dense_replace=2 if dense else 1), 2, 64


EXPERT_MATH = ("aten::mm", "aten::_grouped_mm", "aten::grouped_mm", "aten::addmm", "aten::silu",
               "aten::silu_backward", "aten::mul", "aten::linear", "aten::matmul", "aten::t",
               "mkldnn::_linear_pointwise")  # the products through oneDNN (kernels/gemm.py)


def routing_share(cfg: ModelConfig, batch: int, seq: int, settings: kernels.Settings) -> tuple[float, float]:
    """One MoE layer, forward + backward, under the profiler: (share of its self CPU time outside the expert
    and shared-expert matmuls and their SwiGLU, i.e. router + sort/permute + gather/scatter + balance stats,
    the layer's total ms)."""
    from torch.profiler import ProfilerActivity, profile

    from nanoseek.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(cfg)
    kernels.apply(moe, settings)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    g = torch.randn(batch, seq, cfg.hidden_size)

    def run():
        y, stats = moe(x)
        ((y * g).sum() + stats.balance_loss).backward()

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    ops = prof.key_averages()
    all_time = sum(e.self_cpu_time_total for e in ops)
    math = sum(e.self_cpu_time_total for e in ops if e.key in EXPERT_MATH)
    return 1 - math / all_time, total * 1e3


def spread(xs: list[float], fmt: str = "{:,.0f}") -> str:
    """median (min-max)"""
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def sweep(args, device, ctx, peak) -> None:
    """Every `SWEEP` shape: nanoseek vs transformers' defaults, alternating; a markdown table and the minimum."""
    print(f"sweep of {len(SWEEP)} V3 shapes{' (scaled down: --quick)' if args.quick else ''}, nanoseek vs "
          f"transformers' defaults (grouped_mm, sdpa), AdamW, {args.steps} timed steps each after 3 warm-up")
    print("| shape | vocab | hidden | layers (MoE) | experts, top-k | q-LoRA | batch x seq | nanoseek tok/s "
          "| transformers tok/s | ratio | MFU nanoseek / transformers | peak MiB nanoseek / transformers |")
    print("|---|---:|---:|---|---|---|---|---:|---:|---:|---|---|")
    ratios, heavier = {}, []
    for name in SWEEP:
        args.shape = name
        cfg, batch, seq = sweep_shape(name, args.quick)
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
        steps = {k: step_fn(build(k, cfg, device, args.settings), k == "hf", x[:, :-1], x[:, 1:], ctx)
                 for k in ("ours", "hf")}
        times = interleaved(steps, args.steps)
        del steps
        tok = {k: [batch * seq / t for t in ts] for k, ts in times.items()}
        ratio = [h / o for o, h in zip(times["ours"], times["hf"])]
        ratios[name] = statistics.median(ratio)
        f = train_flops_per_token(cfg, seq).total / peak.flops
        mem = {} if args.no_memory else {k: peak_memory(k, args) for k in ("ours", "hf")}
        if mem and mem["ours"] > mem["hf"]:
            heavier.append(name)
        moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
        print(f"| {name} | {cfg.vocab_size:,} | {cfg.hidden_size} | {cfg.num_hidden_layers} ({moe}) | "
              + (f"{cfg.n_routed_experts}, top-{cfg.num_experts_per_tok}" if moe else "dense") + " | "
              f"{cfg.q_lora_rank or 'none'} | {batch} x {seq} | {spread(tok['ours'])} | {spread(tok['hf'])} | "
              f"{spread(ratio, '{:.2f}x')} | {f * statistics.median(tok['ours']):.1%} / "
              f"{f * statistics.median(tok['hf']):.1%} | "
              + (f"{mem['ours']:,.0f} / {mem['hf']:,.0f} |" if mem else "- |"), flush=True)
    worst = min(ratios, key=ratios.get)
    print(f"\nminimum ratio (median over repeats): {ratios[worst]:.2f}x at {worst}; nanoseek's peak memory above "
          f"transformers' at: {', '.join(heavier) or 'no shape' if not args.no_memory else '(not measured)'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --sweep 4; --quick 2)")
    ap.add_argument("--sweep", action="store_true", help="every shape of SWEEP against transformers' defaults")
    ap.add_argument("--quick", action="store_true", help="with --sweep: the shapes scaled down (a smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--gemm", default="auto", choices=kernels.CHOICES["gemm"], help="nanoseek's kernels.gemm")
    ap.add_argument("--no-keep-freed-memory", action="store_true",
                    help="leave glibc's allocator as it is (default: keep freed memory, as `nanoseek train`)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 4 if args.sweep else 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.settings = kernels.resolve(kernels.Settings(gemm=args.gemm, keep_freed_memory=not args.no_keep_freed_memory))
    allocator = kernels.start_process(args.settings)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    cfg = ModelConfig.preset(args.preset, num_nextn_predict_layers=0)
    if args.shape:
        cfg, args.batch, args.seq = sweep_shape(args.shape, args.quick)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]
    if args.only:
        step = step_fn(build(args.only, cfg, device, args.settings), args.only.startswith("hf"), x, y, ctx)
        for _ in range(args.steps):
            step()
        print(json.dumps({"peak_mib": peak_memory_self(device)}))
        return
    import transformers

    peak = gemm_peak(str(device), "bf16" if device.type == "cuda" else "fp32")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"device {device} ({chip(str(device))}), dtype {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}; GEMM peak {peak}"
          + f"; nanoseek's kernels: {kernels.describe(args.settings)}; {allocator or 'glibc allocator as it was'}")
    if device.type == "cpu":  # MKL's rate differs between processes on some hosts (docs/LOG.md)
        print("this process's 1024^3 GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates().items()))
    if args.sweep:
        return sweep(args, device, ctx, peak)
    kinds = ["ours", "hf", "hf-eager-experts", "ours+mtp"]
    steps = {k: step_fn(build(k, cfg, device, args.settings), k.startswith("hf"), x, y, ctx) for k in kinds}
    times = interleaved(steps, args.steps)
    tokens = args.batch * args.seq
    print(f"preset {args.preset}, batch {args.batch} x seq {args.seq}, AdamW, median of {args.steps} steps")
    share, ms = routing_share(cfg, args.batch, args.seq, args.settings)
    print(f"routing share of one MoE layer (router, sort/permute, gather/scatter, balance stats; fwd+bwd): "
          f"{share:.1%} of {ms:.0f} ms")
    print(f"{'run':<34}{'step ms':>10}{'tok/s':>10}{'MFU':>8}{'vs HF':>8}{'vs HF eager':>13}{'peak MiB':>10}")
    med = {k: statistics.median(v) for k, v in times.items()}
    names = {"ours": "nanoseek", "hf": "transformers (grouped_mm, sdpa)",
             "hf-eager-experts": "transformers (eager experts, sdpa)", "ours+mtp": "nanoseek +MTP (D=1)"}
    for k in kinds:
        f = train_flops_per_token(cfg.replace(num_nextn_predict_layers=1 if k == "ours+mtp" else 0), args.seq,
                                  mtp=k == "ours+mtp").total
        mem = "" if args.no_memory else f"{peak_memory(k, args):.0f}"
        print(f"{names[k]:<34}{med[k] * 1e3:>10.1f}{tokens / med[k]:>10.0f}{f * tokens / med[k] / peak.flops:>8.1%}"
              f"{med['hf'] / med[k]:>8.2f}{med['hf-eager-experts'] / med[k]:>13.2f}{mem:>10}")


if __name__ == "__main__":
    main()
