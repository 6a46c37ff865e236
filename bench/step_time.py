"""Seconds per nanoseek training step at a shape of bench/train_throughput.py, for one checkout of nanoseek: the
A/B of a code change, old and new checkouts run alternately in fresh processes on the same host.

    git worktree add /tmp/old <commit>
    for i in 1 2; do for v in old new; do
        python bench/step_time.py --root $([ $v = old ] && echo /tmp/old || echo .) --shape small; done; done

The step is the benchmark's (`step_fn`: forward with labels, V3's losses, backward, fused AdamW; fp32, 2
threads): 3 warm-up steps, then --steps timed; prints one JSON line (median and every step). A checkout with
nanoseek/kernels runs as `nanoseek train` does (its kernels, glibc keeping freed memory unless
--no-keep-freed-memory); an older one with its model as it was (export NANOSEEK_CPU_GEMM=blas for the same
library).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to time")
ap.add_argument("--shape", default="small")
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--gemm", default="blas", help="kernels.gemm (checkouts with nanoseek/kernels)")
ap.add_argument("--no-keep-freed-memory", action="store_true")
args = ap.parse_args()
sys.path[:0] = [args.root, f"{args.root}/bench"]

import torch  # noqa: E402
import train_throughput as tt  # noqa: E402  (the checkout's own benchmark)

torch.set_num_threads(2)
cfg, b, s = tt.sweep_shape(args.shape)
x = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
if (Path(args.root) / "nanoseek" / "kernels").is_dir():
    from nanoseek import kernels

    settings = kernels.Settings(gemm=args.gemm, keep_freed_memory=not args.no_keep_freed_memory)
    kernels.start_process(settings)
    model = tt.build("ours", cfg, torch.device("cpu"), settings)
else:
    model = tt.build("ours", cfg, torch.device("cpu"))
step = tt.step_fn(model, False, x[:, :-1], x[:, 1:], torch.autocast("cpu", enabled=False))
for _ in range(3):
    step()
times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"root": args.root, "shape": args.shape, "median_s": round(statistics.median(times), 4),
                  "steps_s": [round(t, 4) for t in times]}))
