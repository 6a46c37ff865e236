"""Weight-only quantized CPU decoding: nanoseek (fp32, bf16, int8, int4) vs llama.cpp (F32, BF16, Q8_0, Q4_0),
one set of weights.

    .venv/bin/python bench/decode_quant.py                    # full run (long: 2 threads x 3 batches x 2 prompts x 8)
    .venv/bin/python bench/decode_quant.py --wait-idle 600    # the same, waiting out other processes first
    .venv/bin/python bench/decode_quant.py --quick            # smoke run (nano preset, b 1 and 4, P 128, 8 tokens)
    flags: --skip-llama, --json FILE, --preset NAME, --threads 1,2, --batch 1,4,16, --prompt 128,1024,
    --new-tokens N, --reps R, --rebuild (write the weights and the GGUF files again), --quantize-head

Setup: the `small` preset (`--preset`) without its MTP module (llama.cpp's deepseek2 has none), random init
(seed 0), saved once as a bf16 Hugging Face folder with a small trained tokenizer (a GGUF file carries one; the
benchmark feeds ids) under runs/bench-decode-quant/PRESET-seedS/, and from it one GGUF file per type (nanoseek's
exporter, hf.export_gguf; F32 and BF16 hold the bf16 values exactly, Q8_0 and Q4_0 are llama.cpp's blocks of
32). Both frameworks read those files:
- nanoseek: `load_pretrained(folder, "cpu", dtype, quantize=quant.parse(q))`: fp32, bf16, int8 (per output
  channel) and int4 (groups of 128), the last two with bf16 activations (torch's packed kernels are fast only
  with bf16). Router, kv_b_proj, embedding and head stay in the activation dtype (nanoseek/quant/__init__.py;
  `--quantize-head`: the head too). The GGUF files quantize embedding, head and W^UKV (attn_k_b, attn_v_b)
  as well: at equal bits nanoseek reads more bytes per step (weight MB/step shows how many).
- llama.cpp (llama-cpp-python 0.3.36; installed into runs/.llama-cpp-python, built from source, when
  `import llama_cpp` fails): the GGUF file, default model and context parameters but n_threads =
  n_threads_batch = the thread count, n_seq_max = b, a context of b x (P + N + 1) tokens rounded up, one
  llama_batch of up to b x P tokens; KV cache F32 for the F32 file (nanoseek's cache is in the model's dtype),
  llama.cpp's default F16 otherwise. norms and router are F32 in every file (as llama.cpp's converter does).

Method (one section per threads x batch b x prompt P; `torch.set_num_threads` and llama.cpp's thread count both
set to the threads; prompts are random ids, all rows of length P, no padding):
- nanoseek: one `Engine(max_batch=b, prefill_tokens=b*P)` per format and section, b requests with
  max_tokens=N+1, timed as in bench/decode.py (decode_frameworks.run_ours): prefill = add() + the first step()
  (first token sampled); decode = the remaining N step() calls, one token per row each, greedy.
- llama.cpp: the low-level API (the high-level Llama class runs one sequence): prefill = one llama_decode of
  the b prompts (sequence ids 0..b-1, logits at each prompt's last token) + argmax; decode = N llama_decode
  calls of b tokens (one per sequence, at position P + k) + argmax of each sequence's logits. The KV cache is
  cleared before each run.
- Each runner gets one untimed warm-up (the prompts' first 32 tokens, 2 new tokens), then `reps` repetitions
  interleaved (nanoseek fp32, bf16, int8, int4, llama.cpp F32, ..., Q4_0, again ...). Reported: decode tok/s =
  b*N / decode seconds, median [min-max] over the repetitions; ms per decode step; prefill tok/s = b*P /
  prefill seconds (median); the ratios nanoseek / llama.cpp of the median decode tok/s per format pair.
- weight MB/step: the bytes of the weights one decode step of b tokens reads, in the format as loaded
  (nanoseek: its tensors, packed weights and scales, quant.nbytes; llama.cpp: the GGUF file's tensors): all but
  the embedding and the routed experts, + b embedding rows, + per MoE layer the expected number of distinct
  routed experts b tokens pick (E (1 - (1 - K/E)^b): K at b=1, uniform routing assumed: the weights are random)
  times one expert's bytes. The latent/KV cache read is not in it.
- bw share = weight bytes/step x steps/s / copy bandwidth; the copy bandwidth is measured once, at the largest
  thread count (best of 5 copies of a 256 MiB fp32 tensor, read + written bytes counted); the read bandwidth
  (bench/hostload.py) is printed beside it.
- greedy check (first): nanoseek fp32 and llama.cpp on the F32 file, b=1, the same P=128 ids, greedy, 32 new
  tokens: identical or the first position where they differ (random weights: near-tied logits can flip a token).
Timings on a shared 2-vCPU host are noisy; each section records the cores other processes used meanwhile and
with `--wait-idle S` waits for an idle machine first and repeats a disturbed section, up to twice
(bench/hostload.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanoseek import ModelConfig, Transformer, quant
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import Engine

from decode import code_version  # (bench/ is on a bench script's path)
from decode_frameworks import run_ours
from hostload import Guard, bandwidth_gbs, cpu_busy_s, own_cpu_s, report_load, wait_idle

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench-decode-quant"
LLAMA_DIR, LLAMA_VERSION = ROOT / "runs" / ".llama-cpp-python", "0.3.36"

NANOSEEK = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
            "int4": (torch.bfloat16, "int4")}  # name -> (activation dtype, quantize)
LLAMA = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0"}  # name -> the exporter's qtype
PAIRS = [("int8", "Q8_0"), ("int4", "Q4_0"), ("bf16", "BF16"), ("fp32", "F32")]
RUNS = {False: dict(preset="small", threads="1,2", batch="1,4,16", prompt="128,1024", new_tokens=32, reps=3),
        True: dict(preset="nano", threads="1,2", batch="1,4", prompt="128", new_tokens=8, reps=1)}
GREEDY = (128, 32)  # prompt length and new tokens of the greedy check
TEXT = ["The quick brown fox jumps over the lazy dog. ", "Pack my box with five dozen liquor jugs, 1234567890. ",
        "How vexingly quick daft zebras jump! ", "def f(x):\n    return x * 2 + 1\n"]


# ---------------------------------------------------------------------------------------------- weights and files
def build_folder(preset: str, seed: int, rebuild: bool, log) -> Path:
    """The random bf16 Hugging Face folder (config.json is written last: its presence marks a whole folder)."""
    folder = OUT / f"{preset}-seed{seed}"
    if (folder / "config.json").is_file() and not rebuild:
        return folder
    from safetensors.torch import save_file

    cfg = ModelConfig.preset(preset, num_nextn_predict_layers=0)
    log(f"writing {folder}: {cfg.summary()}, random init (seed {seed}), bf16 ...")
    folder.mkdir(parents=True, exist_ok=True)
    for f in [folder / "config.json", *folder.glob("*.gguf")]:  # the mark of a whole folder; the old weights' files
        f.unlink(missing_ok=True)
    torch.manual_seed(seed)
    model = Transformer(cfg).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.hf_state_dict().items()}, folder / "model.safetensors")
    Tokenizer.train(TEXT * 50, vocab_size=400, out_dir=folder)  # a GGUF file must carry a tokenizer
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "torch_dtype": "bfloat16"}, indent=1))
    return folder


def export_ggufs(folder: Path, log) -> dict[str, Path]:
    from nanoseek.hf import export_gguf as export

    paths = {}
    for name, qtype in LLAMA.items():
        path = folder / f"model-{qtype}.gguf"
        if not path.is_file():
            t0 = time.perf_counter()
            path = Path(export(folder, path, qtype))
            log(f"  exported {path.name} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s)")
        paths[name] = path
    return paths


def import_llama_cpp(log):
    """llama_cpp, installed into runs/.llama-cpp-python (from source) when it is not importable."""
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        pass
    if not (LLAMA_DIR / "llama_cpp" / "__init__.py").is_file():
        log(f"llama_cpp is not importable: pip install --target {LLAMA_DIR.relative_to(ROOT)} "
            f"llama-cpp-python=={LLAMA_VERSION} (builds llama.cpp from source with cmake: 5-15 minutes) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(LLAMA_DIR),
                        f"llama-cpp-python=={LLAMA_VERSION}"], check=True)
    sys.path.append(str(LLAMA_DIR))  # appended: the venv's numpy etc. stay first
    import llama_cpp
    return llama_cpp


# ---------------------------------------------------------------------------------------------- bytes per step
def distinct_experts(cfg: ModelConfig, b: int) -> float:
    """Expected distinct routed experts b tokens pick in one MoE layer (each picks K of E, uniformly)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - K / E) ** b)


def step_bytes(parts: dict, cfg: ModelConfig, b: int) -> float:
    """parts: dense (everything but the embedding and the routed experts), embedding row, one expert of every
    MoE layer together (bytes)."""
    return parts["dense"] + b * parts["embed_row"] + distinct_experts(cfg, b) * parts["expert_all_layers"]


def nanoseek_parts(model: Transformer) -> dict:
    experts = sum(quant.nbytes(m.experts) for m in model.moe_layers())
    embed = quant.nbytes(model.embed_tokens)
    cfg = model.config
    return dict(dense=quant.nbytes(model) - embed - experts, embed_row=embed / cfg.vocab_size,
                expert_all_layers=experts / cfg.n_routed_experts, total=quant.nbytes(model))


def gguf_parts(path: Path, cfg: ModelConfig) -> dict:
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    experts = sum(n for k, n in sizes.items() if "_exps." in k)
    embed = sizes["token_embd.weight"]
    return dict(dense=sum(sizes.values()) - embed - experts, embed_row=embed / cfg.vocab_size,
                expert_all_layers=experts / cfg.n_routed_experts, total=sum(sizes.values()))


def copy_bandwidth_gbs() -> float:
    """Copy bandwidth: the best of 5 copies of a 256 MiB fp32 tensor, (read + written bytes) / seconds."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


# ---------------------------------------------------------------------------------------------- llama.cpp
class LlamaRunner:
    """One llama.cpp context for b sequences of up to max_len tokens; `run(prompts, n)` as run_ours: the
    prefill of the (b, P) prompts, then n greedy decode steps of b tokens."""

    def __init__(self, llama_cpp, model, b: int, P: int, max_len: int, threads: int, f32_cache: bool):
        from llama_cpp._internals import LlamaBatch, LlamaContext

        p = llama_cpp.llama_context_default_params()
        p.n_ctx = b * -(-max_len // 256) * 256
        p.n_batch = b * P
        p.n_seq_max = b
        p.n_threads = p.n_threads_batch = threads
        if f32_cache:
            p.type_k = p.type_v = llama_cpp.GGML_TYPE_F32
        self.ctx = LlamaContext(model=model, params=p, verbose=False)
        self.batch = LlamaBatch(n_tokens=b * P, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = model.n_vocab()

    def _argmax(self, rows: int) -> list[int]:
        """Greedy tokens from the logits of the batch's `rows` outputs (in batch order: one per sequence)."""
        return np.ctypeslib.as_array(self.ctx.get_logits(), shape=(rows, self.n_vocab)).argmax(axis=1).tolist()

    def __call__(self, prompts: torch.Tensor, n: int) -> dict:
        b, P = prompts.shape
        self.ctx.kv_cache_clear()
        t0 = time.perf_counter()
        self.batch.reset()
        for i, row in enumerate(prompts.tolist()):
            self.batch.add_sequence(row, i, logits_all=False)  # positions 0..P-1, logits at the last
        self.ctx.decode(self.batch)
        last = self._argmax(b)
        t1 = time.perf_counter()
        tokens = [[t] for t in last]
        B = self.batch.batch
        for k in range(n):
            B.n_tokens = b
            for i in range(b):
                B.token[i], B.pos[i], B.n_seq_id[i], B.logits[i] = last[i], P + k, 1, True
                B.seq_id[i][0] = i
            self.ctx.decode(self.batch)
            last = self._argmax(b)
            for row, t in zip(tokens, last):
                row.append(t)
        t2 = time.perf_counter()
        return dict(prefill_s=t1 - t0, decode_s=t2 - t1, tokens=tokens)

    def close(self):
        self.batch.close()
        self.ctx.close()


# ---------------------------------------------------------------------------------------------- timing
def runners_for(ours: dict, llama: dict, llama_cpp, b: int, P: int, n: int, threads: int) -> dict:
    """name -> a callable (prompts, n) -> {prefill_s, decode_s, tokens}, for one section."""
    out = {name: functools.partial(run_ours, Engine(m, max_batch=b, max_len=P + n + 1, prefill_tokens=b * P))
           for name, m in ours.items()}
    for name, m in llama.items():
        out[name] = LlamaRunner(llama_cpp, m, b, P, P + n + 1, threads, f32_cache=name == "F32")
    return out


def bench_section(runners: dict, prompts: torch.Tensor, n: int, reps: int) -> dict:
    """Warm-up each, then `reps` interleaved repetitions; per runner the decode and prefill rates."""
    b, P = prompts.shape
    for run in runners.values():
        run(prompts[:, :32], 2)
    runs = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            runs[name].append(run(prompts, n))
    out = {}
    for name, rs in runs.items():
        tok_s = [b * n / r["decode_s"] for r in rs]
        out[name] = dict(decode_tok_s=statistics.median(tok_s), decode_tok_s_min=min(tok_s),
                         decode_tok_s_max=max(tok_s), decode_tok_s_all=tok_s,
                         decode_ms_step=statistics.median(r["decode_s"] / n * 1e3 for r in rs),
                         prefill_tok_s=statistics.median(b * P / r["prefill_s"] for r in rs))
    return out


def greedy_check(ours_fp32, llama_f32, llama_cpp, vocab: int, threads: int) -> dict:
    P, N = GREEDY
    prompt = torch.randint(0, vocab, (1, P), generator=torch.Generator().manual_seed(100))
    a = run_ours(Engine(ours_fp32, max_batch=1, max_len=P + N, prefill_tokens=P), prompt, N - 1)["tokens"][0]
    runner = LlamaRunner(llama_cpp, llama_f32, 1, P, P + N, threads, f32_cache=True)
    h = runner(prompt, N - 1)["tokens"][0]
    runner.close()
    first = next((i for i, (x, y) in enumerate(zip(a, h)) if x != y), None)
    return dict(prompt=P, new_tokens=N, identical=a == h, first_difference=first, nanoseek=a, llama_cpp=h)


# ---------------------------------------------------------------------------------------------- report
def log_section(log, row: dict, parts: dict, cfg: ModelConfig, bw: float) -> None:
    t, b, P, n = row["threads"], row["batch"], row["prompt"], row["new_tokens"]
    log(f"\n### {t} thread{'s' if t > 1 else ''}, batch {b}, prompt {P} ({n} new tokens, {row['reps']} rep"
        f"{'s' if row['reps'] > 1 else ''}; other processes busy {row['other_cores_busy']:.2f} cores)\n")
    log("| framework | format | decode tok/s median [min-max] | ms/step | weight MB/step | bw share | prefill tok/s |")
    log("|---|---|---:|---:|---:|---:|---:|")
    for name, r in row["results"].items():
        r["weight_bytes_step"] = nbytes = step_bytes(parts[name], cfg, b)
        r["bandwidth_share"] = share = nbytes * r["decode_tok_s"] / b / (bw * 1e9)
        log(f"| {'nanoseek' if name in NANOSEEK else 'llama.cpp'} | {name} | {r['decode_tok_s']:.1f} "
            f"[{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}] | {r['decode_ms_step']:.2f} | "
            f"{nbytes / 1e6:.1f} | {share:.0%} | {r['prefill_tok_s']:.0f} |")
    res = row["results"]
    row["ratios"] = {f"{a}/{c}": res[a]["decode_tok_s"] / res[c]["decode_tok_s"] for a, c in PAIRS
                     if a in res and c in res}
    if row["ratios"]:
        log("\nnanoseek / llama.cpp decode tok/s: " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="nano preset, b 1 and 4, P 128, 8 tokens, 1 repetition")
    ap.add_argument("--skip-llama", action="store_true", help="nanoseek only")
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each timed section wait up to S s for an idle machine; redo disturbed sections")
    ap.add_argument("--preset", default=None, help="model preset (default small; --quick: nano)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,4,16; --quick: 1,4)")
    ap.add_argument("--prompt", default=None, help="comma-separated prompt lengths (default 128,1024; --quick: 128)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 32; --quick: 8)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; --quick: 1)")
    ap.add_argument("--rebuild", action="store_true", help="write the weights and GGUF files again")
    ap.add_argument("--quantize-head", action="store_true",
                    help="nanoseek int8/int4 quantize the head too (Spec.head; the GGUF files' is Q8_0/Q4_0)")
    args = ap.parse_args()
    for k, v in RUNS[args.quick].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    threads, batches, prompts_len = ints(args.threads), ints(args.batch), ints(args.prompt)
    n, reps = args.new_tokens, args.reps

    log = functools.partial(print, flush=True)
    busy0 = wait_idle(args.wait_idle, log)
    t_all, cpu0, own0 = time.perf_counter(), cpu_busy_s(), own_cpu_s()
    folder = build_folder(args.preset, args.seed, args.rebuild, log)
    results: dict = dict(argv=sys.argv[1:], quick=args.quick, preset=args.preset, seed=args.seed, folder=str(folder),
                         quantize_head=args.quantize_head,
                         torch=torch.__version__, code=code_version(), other_cores_busy_at_start=busy0)

    # ------------------------------------------------------------------ the models
    ours, parts = {}, {}
    for name, (dtype, q) in NANOSEEK.items():
        spec = quant.parse(q, group_size=128, head=args.quantize_head)
        ours[name] = load_pretrained(folder, device="cpu", dtype=dtype, quantize=spec).model
        parts[name] = nanoseek_parts(ours[name])
    cfg = ours["fp32"].config
    llama_cpp, llama, why_no_llama = None, {}, "--skip-llama" if args.skip_llama else None
    if not args.skip_llama:
        try:
            paths = export_ggufs(folder, log)
        except ImportError as e:
            why_no_llama = f"nanoseek's GGUF exporter is missing ({e})"
        else:
            llama_cpp = import_llama_cpp(log)
            from llama_cpp._internals import LlamaModel
            from llama_cpp._logger import set_verbose

            set_verbose(False)  # llama.cpp's errors only
            for name, path in paths.items():
                llama[name] = LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                         verbose=False)
                parts[name] = gguf_parts(path, cfg)
            results.update(llama_cpp=llama_cpp.__version__,
                           llama_system_info=llama_cpp.llama_print_system_info().decode().strip())
    if why_no_llama:
        log(f"llama.cpp side skipped: {why_no_llama}")
    results["bytes"] = parts

    torch.set_num_threads(max(threads))
    copy_bw, read_bw = copy_bandwidth_gbs(), bandwidth_gbs()
    results.update(copy_bandwidth_gbs=copy_bw, read_bandwidth_gbs=read_bw)
    log(f"torch {torch.__version__}, llama-cpp-python {results.get('llama_cpp', '-')}, CPU ({os.cpu_count()} cores); "
        f"copy bandwidth {copy_bw:.1f} GB/s, read bandwidth {read_bw:.1f} GB/s ({max(threads)} threads); other "
        f"processes busy {busy0:.2f} cores at the start; nanoseek {results['code']}")
    if "llama_system_info" in results:
        log(f"llama.cpp: {results['llama_system_info']}")
    p = cfg.num_params()
    log(f"preset {args.preset} without MTP: {p.total / 1e6:.1f}M params, {p.activated / 1e6:.1f}M activated; "
        "weights in MB as loaded: " + ", ".join(f"{k} {v['total'] / 1e6:.0f}" for k, v in parts.items()))

    guard = Guard(args.wait_idle, log)
    if llama:
        log(f"\n## Greedy check (fp32 / F32, b=1, P={GREEDY[0]}, {GREEDY[1]} new tokens)\n")
        g = guard("greedy", lambda: greedy_check(ours["fp32"], llama["F32"], llama_cpp, cfg.vocab_size,
                                                  max(threads)))
        results["greedy"] = g
        verdict = (f"identical ({g['new_tokens']} tokens)" if g["identical"] else
                   f"differ from position {g['first_difference']} on\n  nanoseek  {g['nanoseek']}\n"
                   f"  llama.cpp {g['llama_cpp']}")
        log(f"nanoseek fp32 and llama.cpp F32: {verdict}")

    # ------------------------------------------------------------------ timed sections
    log(f"\n## Decode (tok/s = b*N / decode seconds; {reps} repetition{'s' if reps > 1 else ''} interleaved)")
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for b in batches:
            for P in prompts_len:
                prompts = torch.randint(0, cfg.vocab_size, (b, P), generator=torch.Generator().manual_seed(b * P))
                label = f"t{t} b{b} P{P}"
                t0 = time.perf_counter()

                def section():
                    runners = runners_for(ours, llama, llama_cpp, b, P, n, t)
                    try:
                        return bench_section(runners, prompts, n, reps)
                    finally:
                        for r in runners.values():
                            getattr(r, "close", lambda: None)()
                        gc.collect()

                row = dict(threads=t, batch=b, prompt=P, new_tokens=n, reps=reps, results=guard(label, section))
                row.update(other_cores_busy=guard.record[label], wall_s=time.perf_counter() - t0)
                log_section(log, row, parts, cfg, copy_bw)
                rows.append(row)
    results["sections"] = rows

    if llama and rows:
        log("\n## nanoseek / llama.cpp, decode tok/s (medians)\n")
        log("| threads | batch | prompt | " + " | ".join(f"{a} / {c}" for a, c in PAIRS) + " |")
        log("|---:|---:|---:|" + "---:|" * len(PAIRS))
        for r in rows:
            log(f"| {r['threads']} | {r['batch']} | {r['prompt']} | "
                + " | ".join(f"{r['ratios'][f'{a}/{c}']:.2f}x" for a, c in PAIRS) + " |")

    report_load(results, guard, t_all, cpu0, own0, log)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
