"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, same config, weights, batch, loop.

    python bench/train_throughput.py --preset small --batch 8 --seq 512 --steps 6

Both run one AdamW step per iteration on the same random tokens (fp32 on CPU, bf16 autocast on CUDA),
interleaved A B A B so machine drift hits both; the median step time after warm-up is reported.
Baselines: transformers with its defaults (experts_implementation="grouped_mm", attn_implementation="sdpa")
and with per-expert loops (experts_implementation="eager"). MTP is off (transformers has none); the
nanoseek row "+MTP" shows the cost of the V3 MTP module on top. MFU uses `nanoseek.cost`'s formula and a
GEMM peak measured here. Peak memory is measured per framework in a fresh subprocess (VmHWM).
`--threads N` sets the torch thread count; `--keep-freed-memory` makes glibc reuse freed pages (no mmap,
no trim) for the whole process, so for both frameworks (docs/LOG.md: page faults in training).
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

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: huge pages for both frameworks (cli.py)
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.cost import measure_gemm_peak, train_flops_per_token
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
        with ctx:
            if is_hf:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = v3_loss(model(x, labels=y), mtp_lambda=0.3, alpha=1e-4)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def build(kind: str, cfg: ModelConfig, device):
    torch.manual_seed(0)
    mtp = kind == "ours+mtp"
    ours = Transformer(cfg.replace(num_nextn_predict_layers=1 if mtp else 0)).to(device).train()
    if kind.startswith("hf"):
        return make_hf(cfg, "grouped_mm" if kind == "hf" else "eager", ours.cpu()).to(device)
    return ours


def peak_rss_self() -> float:
    """This process's peak RSS in MiB: VmHWM (ru_maxrss survives fork + exec on Linux, so a child started by a
    big parent would report the parent's peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(kind: str, args) -> float:
    """Peak RSS (MiB) of a fresh process doing 3 steps of `kind` only."""
    code = (f"import sys; sys.argv=['x','--preset',{args.preset!r},'--batch','{args.batch}','--seq','{args.seq}',"
            f"'--steps','3','--only',{kind!r}]; import runpy; runpy.run_path({__file__!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mib"]


EXPERT_MATH = ("aten::mm", "aten::_grouped_mm", "aten::grouped_mm", "aten::addmm", "aten::silu",
               "aten::silu_backward", "aten::mul", "aten::linear", "aten::matmul", "aten::t")


def routing_share(cfg: ModelConfig, batch: int, seq: int) -> tuple[float, float]:
    """One MoE layer, forward + backward, under the profiler: (share of its self CPU time outside the expert
    and shared-expert matmuls and their SwiGLU, i.e. router + sort/permute + gather/scatter + balance stats,
    the layer's total ms)."""
    from torch.profiler import ProfilerActivity, profile

    from nanoseek.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(cfg)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc reuses freed pages (both frameworks: one process)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:  # glibc mallopt: M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2^31 - 1
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 2**31 - 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    cfg = ModelConfig.preset(args.preset, num_nextn_predict_layers=0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]
    kinds = ["ours", "hf", "hf-eager-experts", "ours+mtp"]
    if args.only:
        step = step_fn(build(args.only, cfg, device), args.only.startswith("hf"), x, y, ctx)
        for _ in range(args.steps):
            step()
        print(json.dumps({"rss_mib": peak_rss_self()}))
        return
    steps = {k: step_fn(build(k, cfg, device), k.startswith("hf"), x, y, ctx) for k in kinds}
    times = {k: [] for k in kinds}
    for i in range(args.steps + 2):
        for k in kinds:
            t0 = time.perf_counter()
            steps[k]()
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    peak = measure_gemm_peak(device=device)
    tokens = args.batch * args.seq
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}, dtype {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    print(f"preset {args.preset}, batch {args.batch} x seq {args.seq}, AdamW, median of {args.steps} steps; "
          f"measured GEMM peak {peak / 1e9:.0f} GFLOP/s")
    share, ms = routing_share(cfg, args.batch, args.seq)
    print(f"routing share of one MoE layer (router, sort/permute, gather/scatter, balance stats; fwd+bwd): "
          f"{share:.1%} of {ms:.0f} ms")
    print(f"{'run':<34}{'step ms':>10}{'tok/s':>10}{'MFU':>8}{'vs HF':>8}{'vs HF eager':>13}{'peak MiB':>10}")
    med = {k: statistics.median(v) for k, v in times.items()}
    names = {"ours": "nanoseek", "hf": "transformers (grouped_mm, sdpa)",
             "hf-eager-experts": "transformers (eager experts, sdpa)", "ours+mtp": "nanoseek +MTP (D=1)"}
    for k in kinds:
        f = train_flops_per_token(cfg.replace(num_nextn_predict_layers=1 if k == "ours+mtp" else 0), args.seq,
                                  mtp=k == "ours+mtp").total
        rss = "" if args.no_memory else f"{peak_rss(k, args):.0f}"
        print(f"{names[k]:<34}{med[k] * 1e3:>10.1f}{tokens / med[k]:>10.0f}{f * tokens / med[k] / peak:>8.1%}"
              f"{med['hf'] / med[k]:>8.2f}{med['hf-eager-experts'] / med[k]:>13.2f}{rss:>10}")


if __name__ == "__main__":
    main()
