"""Where one training step goes, nanoseek beside transformers, at a shape of `bench/train_throughput.py`.

    .venv/bin/python bench/train_profile.py --shape v48k-h768-e32k6          # both frameworks, top 25 ops
    .venv/bin/python bench/train_profile.py --shape v4k-h256-e8k2 --only ours --top 40
    .venv/bin/python bench/train_profile.py --shape all --top 0                # the bound table, every shape

The same step as the throughput benchmark (forward + backward + fused AdamW on the same weights, fp32 on CPU),
under torch.profiler after warm-up: per framework the step's wall time, the self CPU time per op (ms per step,
summed over the profiled steps and divided by their count) and the same time in groups (GEMMs, grouped GEMMs,
attention kernels, elementwise, data movement, the optimizer, the rest; the batched products of a matmul-based
attention, nanoseek's blocked kernel on CPU or transformers' math SDPA, count as GEMMs, their softmax as
elementwise). The groups say where a framework spends what the other does not; docs/LOG.md keeps the tables
that motivated each change.

Then the bound at each shape: with both frameworks running the same GEMMs, nanoseek's step cannot be shorter
than its own GEMM time (GEMMs + grouped GEMMs, profiled), so transformers' step over that time is the largest
ratio any change outside the GEMMs can reach, and transformers' step / 1.5 less that GEMM time is what the rest
of nanoseek's step (attention, elementwise, data movement, the optimizer) may take for a 1.5x ratio.
Step times here are unprofiled (the median of --steps timed steps before the profiled ones).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from train_throughput import SWEEP, build, step_fn, sweep_shape  # noqa: E402

from nanoseek import kernels  # noqa: E402

GROUPS = {  # first match wins, on the op name
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
             "mkldnn::_linear_pointwise"),
    "grouped GEMM": ("aten::_grouped_mm", "aten::grouped_mm"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention"),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach", "Optimizer"),
    "data movement": ("aten::copy_", "aten::index", "aten::gather", "aten::scatter", "aten::cat", "aten::sort",
                      "aten::argsort", "aten::index_add", "aten::index_select", "aten::embedding", "aten::clone",
                      "aten::contiguous", "aten::repeat", "aten::stack", "aten::bincount", "aten::histc",
                      "aten::cumsum", "aten::topk", "aten::zero_", "aten::fill_", "aten::masked", "aten::nonzero"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::sigmoid", "aten::exp",
                    "aten::log", "aten::pow", "aten::rsqrt", "aten::mean", "aten::sum", "aten::neg", "aten::where",
                    "aten::_softmax", "aten::_log_softmax", "aten::softmax", "aten::log_softmax", "aten::max",
                    "aten::amax", "aten::sqrt", "aten::rms_norm", "aten::_fused_rms_norm", "aten::nll_loss",
                    "aten::cos", "aten::sin", "aten::clamp", "aten::tanh", "aten::threshold", "aten::eq",
                    "aten::ne", "aten::gt", "aten::lt", "aten::ge", "aten::le", "aten::logsumexp"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def profile_step(step, steps: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(seconds per step, [(op, self CPU ms per step, calls per step)]) over `steps` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
    return wall, sorted(rows, key=lambda r: -r[1])


def print_profile(results: dict[str, tuple[float, list]], top: int, tokens: int) -> None:
    """Per entry its op table (top ops by self CPU time), then the groups side by side."""
    for kind, (wall, rows) in results.items():
        total = sum(ms for _, ms, _ in rows)
        print(f"## {kind}: {wall * 1e3:.0f} ms per step ({tokens / wall:,.0f} tok/s); "
              f"profiled self CPU {total:.0f} ms\n")
        print("| op | ms / step | share | calls / step |\n|---|---:|---:|---:|")
        for name, ms, calls in rows[:top]:
            print(f"| {name} | {ms:.1f} | {ms / total:.1%} | {calls} |")
        print()
    kinds = list(results)
    groups = {k: collections.Counter() for k in kinds}
    for kind, (_, rows) in results.items():
        for name, ms, _ in rows:
            groups[kind][group_of(name)] += ms
    print("| group | " + " | ".join(f"{k} ms" for k in kinds) + " |\n|---|" + "---:|" * len(kinds))
    for group in [*GROUPS, "other"]:
        print(f"| {group} | " + " | ".join(f"{groups[k][group]:.0f}" for k in kinds) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=[*sorted(SWEEP), "all"])
    ap.add_argument("--only", choices=("ours", "hf"), default=None)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = kernels.resolve(kernels.Settings())  # as `nanoseek train`: its kernels, glibc keeping freed memory
    kernels.start_process(settings)
    bounds = {}
    for shape in list(SWEEP) if args.shape == "all" else [args.shape]:
        cfg, batch, seq = sweep_shape(shape)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        results, walls = {}, {}
        for kind in [args.only] if args.only else ["ours", "hf"]:
            model = build(kind, cfg, torch.device("cpu"), settings)
            step = step_fn(model, kind == "hf", x, y, torch.autocast("cpu", enabled=False))
            for _ in range(3):
                step()
            walls[kind] = statistics.median(timed(step) for _ in range(args.steps))
            results[kind] = profile_step(step, args.steps)
            del model, step
        print(f"{shape}: {batch} x {seq} tokens per step, {args.threads} threads, {args.steps} profiled steps\n")
        if args.top:
            print_profile(results, args.top, batch * seq)
        if len(results) == 2:
            bounds[shape] = bound(walls, results)
    if bounds:
        print("\n| shape | nanoseek s | transformers s | ratio | nanoseek GEMM s | largest ratio | rest now s "
              "| rest for 1.5x s |\n|---|" + "---:|" * 7)
        for shape, row in bounds.items():
            print(f"| {shape} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def bound(walls: dict[str, float], results: dict[str, tuple[float, list]]) -> tuple[float, ...]:
    """(ours s, hf s, ratio, our GEMM s, hf / our GEMM, our rest s, the rest's budget for 1.5x)."""
    ours, hf = walls["ours"], walls["hf"]
    gemm = sum(ms for op, ms, _ in results["ours"][1] if group_of(op) in ("GEMM", "grouped GEMM")) / 1e3
    return ours, hf, hf / ours, gemm, hf / gemm, ours - gemm, hf / 1.5 - gemm


if __name__ == "__main__":
    main()
