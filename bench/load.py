"""Loading a sharded bf16 checkpoint: nanoseek's `load_pretrained` vs transformers' `from_pretrained`.

    python bench/load.py                 # ~2 minutes on 2 CPU cores; the checkpoint is built once (--dir)

The checkpoint (0.44B parameters, 884 MB): DeepseekV3ForCausalLM with hidden 1024, vocabulary 129,280 and 4
layers (1 dense, 3 MoE of 32 experts, top-4), transformers' random init, saved by `save_pretrained` in bf16 in
two shards. Each load runs in a fresh subprocess that imports torch, transformers and nanoseek.hf (the same
imports for both), reads its peak RSS, loads (nanoseek: `load_pretrained(dir)`, bf16 from the config;
transformers: `from_pretrained(dir, dtype=torch.bfloat16)`), and reads it again. Peak RSS is VmHWM
(/proc/self/status): ru_maxrss starts at the parent's peak (it survives fork and exec).
The files are read once before timing (page cache warm), then the two loaders alternate --reps times; each
load records the cores other processes used meanwhile (bench/hostload.py; --wait-idle S waits for a quiet
host and redoes a disturbed load). Printed: median and min-max of load seconds and of peak RSS above the
baseline, the ratios, and the targets beside them (not asserted): peak RSS <= 1.25x the checkpoint's bytes,
time <= transformers'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hostload import Guard, other_load  # noqa: E402  (bench/ is on a bench script's path)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=129280, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
             num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=512, kv_lora_rank=256,
             n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=0,
             max_position_embeddings=4096)


def build(directory: Path) -> None:
    """The random bf16 checkpoint, saved by transformers (once: a folder with config.json is kept)."""
    if (directory / "config.json").is_file():
        return
    import torch
    import transformers

    from nanoseek.config import ModelConfig

    cfg = ModelConfig(**SHAPE)
    print(f"building {directory}: {cfg.summary()} ...", flush=True)
    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="500MB")


def peak_rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def child(kind: str, directory: str) -> None:
    """One load in this fresh process; prints {seconds, peak_above, params, dtype} as JSON."""
    import torch
    import transformers

    from nanoseek.hf import load_pretrained

    transformers.logging.set_verbosity_error()
    base = peak_rss()
    t0 = time.perf_counter()
    if kind == "nanoseek":
        model = load_pretrained(directory).model
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(json.dumps(dict(seconds=seconds, peak_above=peak_rss() - base, dtype=dtypes,
                          params=sum(p.numel() for p in model.parameters()))))


def one_load(kind: str, directory: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(directory)], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{kind} load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def spread(xs: list[float], fmt) -> str:
    return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nanoseek-bench-load"), help="checkpoint (built once)")
    ap.add_argument("--reps", type=int, default=3, help="loads per loader (>= 3)")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s for a quiet host before each load")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    build(args.dir)
    files = sorted(args.dir.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    for f in files:  # page cache warm: both loaders read from memory
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    print(f"checkpoint {args.dir}: {len(files)} shards, {nbytes / 1e6:.0f} MB; other processes use "
          f"{other_load():.2f} cores", flush=True)
    guard = Guard(args.wait_idle, print)
    runs = {"nanoseek": [], "transformers": []}
    for kind in runs:
        one_load(kind, args.dir)  # warm-up (imports compiled, page cache)
    for rep in range(max(3, args.reps)):
        for kind in runs:
            r = guard(f"{kind} {rep}", lambda k=kind: one_load(k, args.dir))
            r["other_cores"] = guard.record[f"{kind} {rep}"]
            runs[kind].append(r)
            print(f"  {kind:12s} rep {rep}: {r['seconds']:.2f} s, peak +{r['peak_above'] / 2**20:,.0f} MiB, "
                  f"{r['params'] / 1e9:.3f}B params {r['dtype']}, other cores {r['other_cores']:.2f}", flush=True)
    sec = {k: [r["seconds"] for r in v] for k, v in runs.items()}
    mib = {k: [r["peak_above"] / 2**20 for r in v] for k, v in runs.items()}
    print("\n| loader | load s, median (min-max) | peak RSS above baseline, MiB | peak / checkpoint bytes |")
    print("|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {spread(sec[k], '{:.2f}'.format)} | {spread(mib[k], '{:,.0f}'.format)} | "
              f"{statistics.median(mib[k]) * 2**20 / nbytes:.2f}x |")
    t_ratio = statistics.median(sec["nanoseek"]) / statistics.median(sec["transformers"])
    m_ratio = statistics.median(mib["nanoseek"]) / statistics.median(mib["transformers"])
    peak = statistics.median(mib["nanoseek"]) * 2**20 / nbytes
    print(f"\nnanoseek / transformers: time {t_ratio:.2f}x (target <= 1: {'met' if t_ratio <= 1 else 'missed'}), "
          f"peak RSS {m_ratio:.2f}x; nanoseek peak = {peak:.2f}x checkpoint bytes (target <= 1.25: "
          f"{'met' if peak <= 1.25 else 'missed'})")


if __name__ == "__main__":
    main()
