"""Scaling: training tokens/s of the `nano` preset at 1 and 2 processes, and where the time goes.

    python bench/scaling.py                      # CPU: 1 process (2 and 1 threads), 2 gloo ranks (ep 1, 2)
    python bench/scaling.py --steps 16 --batch 8 --seq 256

Every row runs the real training loop (`nanoseek.train.loop.train`) on the built-in corpus with the same
global batch; multi-process rows are launched by torchrun (one thread per rank, as torchrun sets). Tokens/s
is the median of the loop's per-step tok/s over the steps after the profiled window (steps 10 to 16);
the all-to-all share (expert-parallel dispatch and combine) and the share of the other collectives (FSDP
all-gather / reduce-scatter, the all-reduces of counts, losses and the gradient norm) are rank 0's time
inside those ops over the time of the profiled steps (torch.profiler, steps 4 to 9; plain single-process
rows are not profiled). On a CUDA machine the rows are 1 GPU and all GPUs
(ep 1 and ep = GPUs), NCCL, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WAIT, ACTIVE = 2, 6  # profiler schedule, in steps: skip 2, record 6


def worker(args) -> None:
    """One rank (or the single process): train with a profiler stepped by each forward."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import resolve_data, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = load_train_config(None, [
        "preset=nano", f"data.path={args.data}", f"out_dir={out / 'run'}", f"steps={args.steps}",
        f"batch_size={args.batch}", f"data.seq_len={args.seq}", "log_every=1", f"eval_every={args.steps}",
        "eval_batches=1", f"ckpt_every={args.steps}", f"ep={args.ep}", f"device={args.device}"])
    cfg, shards, _ = resolve_data(cfg)
    shares = {"all_to_all_share": 0.0, "other_collectives_share": 0.0}
    if "WORLD_SIZE" not in os.environ:  # a plain process has no collectives to time (and 2 threads under
        train(cfg, shards, quiet=True)  # the profiler run 100x slower)
    else:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities, schedule=schedule(wait=WAIT, warmup=1, active=ACTIVE, repeat=1),
                     on_trace_ready=lambda p: shares.update(time_shares(p.events()))) as prof:
            train(cfg, shards, quiet=True, init=lambda m: m.register_forward_pre_hook(lambda *_: prof.step()))
    if int(os.environ.get("RANK", "0")) == 0:
        lines = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        tok_s = [r["tok_s"] for r in lines if "tok_s" in r and r["step"] > WAIT + 1 + ACTIVE]
        (out / "result.json").write_text(json.dumps({"tok_s": statistics.median(tok_s), **shares}))


def time_shares(events) -> dict:
    """Time inside all-to-all and inside other collectives over the profiled steps' time (merged intervals
    of matching ops, so nested records of one op count once)."""
    def merged(match) -> float:
        spans = sorted((e.time_range.start, e.time_range.end) for e in events if match(e.name.lower()))
        total, end = 0.0, float("-inf")
        for s, t in spans:
            if t > end:
                total += t - max(s, end)
                end = t
        return total

    steps = merged(lambda n: n.startswith("profilerstep"))
    # the expert-parallel exchange: its ops, and the waits of the functional collectives (only EP uses them)
    a2a_ops = ("all_to_all", "alltoall", "wait_tensor")
    a2a = merged(lambda n: any(k in n for k in a2a_ops))
    coll = merged(lambda n: any(k in n for k in a2a_ops + ("all_gather", "allgather", "reduce_scatter",
                                                           "allreduce", "all_reduce", "barrier", "broadcast")))
    return {"all_to_all_share": a2a / steps if steps else 0.0, "other_collectives_share": (coll - a2a) / steps
            if steps else 0.0}


def launch(args, name: str, nproc: int, ep: int, threads: int) -> dict:
    out = Path(args.out) / name
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    flags = ["--worker", "--data", str(args.data), "--out", str(out), "--steps", str(args.steps), "--batch",
             str(args.batch), "--seq", str(args.seq), "--ep", str(ep), "--device", args.device]
    script = str(Path(__file__).resolve())
    if nproc == 1 and ep == 1 and args.device == "cpu":  # a plain single process: no process group
        cmd = [sys.executable, script, *flags, "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    result = json.loads((out / "result.json").read_text())
    return {"name": name, "processes": nproc, "ep": ep, "threads_per_process": threads, **result,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--out", default="runs/bench/scaling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from nanoseek.data.builtin import ensure_builtin_data

    args.data = ensure_builtin_data(ROOT / "runs" / "bench" / "data", vocab_size=2048, n_train_docs=6000,
                                    progress=False)
    if args.device == "cuda":
        n = torch.cuda.device_count()
        rows = [("1 GPU", 1, 1, 1)] + ([(f"{n} GPUs, ep 1", n, 1, 1), (f"{n} GPUs, ep {n}", n, n, 1)] if n > 1 else [])
    else:
        rows = [("1 process, 2 threads", 1, 1, 2), ("1 process, 1 thread", 1, 1, 1),
                ("2 processes (FSDP), ep 1", 2, 1, 1), ("2 processes (FSDP), ep 2", 2, 2, 1)]
    print(f"torch {torch.__version__}, {args.device}, nano preset, global batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps per row")
    results = []
    for name, nproc, ep, threads in rows:
        r = launch(args, name.replace(" ", "_").replace(",", ""), nproc, ep, threads)
        r["name"] = name
        results.append(r)
        print(f"{name:<28} {r['tok_s']:>9,.0f} tok/s   all-to-all {r['all_to_all_share']:6.1%}   "
              f"other collectives {r['other_collectives_share']:6.1%}   ({r['wall_s']} s)", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
