"""The headline run: a random checkpoint with DeepSeek-V2-Lite's exact config (27 layers, 64 routed + 2 shared
experts, 15.7B parameters, 31 GB in bf16) served with --quantize int4 on a 24 GB machine, and the same weights
in llama.cpp at Q4_0.

    .venv/bin/python bench/v2lite.py                 # write the checkpoint once (runs/v2-lite-random), then measure
    .venv/bin/python bench/v2lite.py --json FILE     # also save the numbers

Method:
- the checkpoint: every tensor N(0, 0.02) in bf16 (norms 1), seeded, as a sharded Hugging Face folder with
  nanoseek's tokenizer (a small vocabulary inside V2-Lite's 102400 rows); written once and reused.
- nanoseek: a fresh subprocess runs `load_pretrained(FOLDER, quantize=Spec(4, 128))` (what `nanoseek serve
  FOLDER --quantize int4` does): load seconds, peak RSS (VmHWM) and the RSS after the load; then decode tok/s
  with an Engine at batch 1 and 4 (prompt 128 tokens, N new tokens, 3 repetitions: median [min-max]).
- llama.cpp: the folder exported to Q4_0 with `nanoseek export FOLDER OUT.gguf --gguf q4_0` (streamed, timed),
  loaded by llama-cpp-python in a fresh subprocess (load seconds, peak RSS), decode tok/s at batch 1 and 4 as
  bench/decode_quant.py times it.
Both sides use 2 threads. Numbers are for the host printed at the top.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "runs" / "v2-lite-random"
SHARD_BYTES = 4 << 30


def write_checkpoint(folder: Path) -> None:
    """A random V2-Lite-shaped bf16 folder, tensor by tensor (one shard in memory at a time)."""
    from safetensors.torch import save_file

    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model import Transformer, hf_keys

    cfg = ModelConfig.preset("v2-lite")
    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    shapes = {k: v.shape for k, v in hf_keys.to_hf(state, cfg, mtp_copies=False).items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, t0 = [], {}, 0, time.perf_counter()
    total = sum(math.prod(s) for s in shapes.values()) * 2
    written = 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, folder / name, metadata={"format": "pt"})
        shards.append((name, list(current)))

    for key, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=gen).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if current and size + nbytes > SHARD_BYTES:
            flush()
            current, size = {}, 0
        current[key], size, written = t, size + nbytes, written + nbytes
        print(f"\r  writing {folder}: {written / 2**30:.1f} / {total / 2**30:.1f} GiB, "
              f"{written / 2**20 / (time.perf_counter() - t0):.0f} MiB/s", end="", flush=True)
    flush()
    print()
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in shards for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "torch_dtype": "bfloat16"}, indent=1))
    texts = [f"{a}+{b}=<answer>{a + b}</answer>" for a in range(300) for b in range(0, 300, 7)]
    Tokenizer.train(texts, 1024, folder)


COMMON = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads(2)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def rates(run, b, n, reps):
    prompts = torch.randint(0, 1024, (b, 128), generator=torch.Generator().manual_seed(b))
    run(b, prompts[:, :16], 2)  # warm-up
    r = [b * n / run(b, prompts, n)["decode_s"] for _ in range(reps)]
    return dict(median=statistics.median(r), min=min(r), max=max(r))
t0 = time.perf_counter()
"""

NANOSEEK = COMMON + r"""
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import Engine
from nanoseek.quant import Spec
from decode_frameworks import run_ours
model = load_pretrained({path!r}, quantize=Spec(4, 128)).model
out = dict(load_s=time.perf_counter() - t0, peak_rss=rss("VmHWM:"), rss=rss("VmRSS:"))
run = lambda b, prompts, n: run_ours(Engine(model, max_batch=b, max_len=128 + n + 1, prefill_tokens=b * 128),
                                     prompts, n)
out["decode"] = {{b: rates(run, b, {new}, {reps}) for b in (1, 4)}}
print("RESULT" + json.dumps(out))
"""

LLAMA = COMMON + r"""
from decode_quant import LlamaRunner, import_llama_cpp
llama_cpp = import_llama_cpp(print)
from llama_cpp._internals import LlamaModel
model = LlamaModel(path_model={path!r}, params=llama_cpp.llama_model_default_params(), verbose=False)
out = dict(load_s=time.perf_counter() - t0, peak_rss=rss("VmHWM:"), rss=rss("VmRSS:"))
run = lambda b, prompts, n: LlamaRunner(llama_cpp, model, b, 128, 128 + n + 1, 2, False)(prompts, n)
out["decode"] = {{b: rates(run, b, {new}, {reps}) for b in (1, 4)}}
print("RESULT" + json.dumps(out))
"""


def run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the measuring subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=FOLDER)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.folder / "model.safetensors.index.json").is_file():
        write_checkpoint(args.folder)
    fmt = dict(bench=str(ROOT / "bench"), new=args.new_tokens, reps=args.reps)
    result = {"nanoseek_int4": run(NANOSEEK.format(path=str(args.folder), **fmt))}
    print(f"nanoseek int4 (g128): {result['nanoseek_int4']}", flush=True)
    if not args.skip_llama:
        from nanoseek.hf import export_gguf

        gguf = args.folder / "model-q4_0.gguf"
        if not gguf.is_file():
            t0 = time.perf_counter()
            export_gguf(args.folder, gguf, "q4_0")
            result["export_q4_0_s"] = time.perf_counter() - t0
        result["llama_cpp_q4_0"] = run(LLAMA.format(path=str(gguf), **fmt))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
