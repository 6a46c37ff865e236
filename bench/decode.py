"""Decode benchmark: the nanoseek inference engine vs transformers' DeepseekV3ForCausalLM.generate.

    .venv/bin/python bench/decode.py                      # full run (~3-4 min on 2 idle cores)
    .venv/bin/python bench/decode.py --wait-idle 600      # the same, waiting out other processes first
    .venv/bin/python bench/decode.py --quick              # smoke run (fewer tokens and repetitions)
    flags: --skip-hf, --checkpoint PATH (MTP section), --json FILE, --profile (op table, b=16 breakdown), --no-big,
    --device cuda (both frameworks on the GPU, fp32; the CPU-only sections are left out: the big shape's peak
    RSS, the MTP checkpoint, the profile)

Prints measurements and ratios; the targets they are read against (D1-D4, K1, R1, S1) are in README.md
(Measured, Decoding). Setup: `small` preset, random init, fp32, one set of weights in both frameworks (nanoseek
`Transformer` -> its state dict under transformers-5 names, the stacked experts as they are; MTP is not loaded
into transformers, which has none), 2 threads (`--threads`).

Method (prompts are random ids in the vocab, all rows of a batch the same length, so no padding; the two
frameworks and one timed run of each in bench/decode_frameworks.py):
- nanoseek: one `Engine(max_batch=b, prefill_tokens=b*P)` per shape (all b prompts are prefilled in one step),
  b requests with `max_tokens=N+1`. prefill = `add()` of the b prompts + the first `step()` (the prefill forward,
  first token sampled). decode = the remaining N `step()` calls (one new token per row each).
- transformers: `generate(ids, attention_mask=ones, max_new_tokens=N+1, min_new_tokens=N+1, do_sample=False)`,
  its defaults otherwise (DynamicCache, experts_implementation="grouped_mm", sdpa). A LogitsProcessor records
  the time at each of its N+1 calls (one per forward): prefill = call 0 - generate() entry (input checks, cache
  set-up, the prefill forward); decode = call N - call 0 (N forwards, each with generate's per-token work).
- tok/s = b*N / decode seconds and b*P / prefill seconds. One untimed warm-up per shape, then `reps`
  repetitions interleaved (nanoseek, transformers, nanoseek, ...); medians of the per-repetition rates.
- b=16, P=1024: the prefill alone takes 10-20 s per framework, so this shape runs once per framework, each in a
  fresh subprocess (transformers with its own random init: same init distribution, another draw) after a warm-up
  at P=16; the same run gives the peak memory: the peak is reset after the build and the warm-up
  (`/proc/self/clear_refs` = 5), and RSS after the build and VmHWM (peak RSS) during the generation are reported.
- cache bytes/token: nanoseek `engine.cache` (main layers and the MTP layer apart) vs (r_kv + d_r) * L * 4;
  transformers: the bytes of every tensor in the DynamicCache returned by generate, / (b * cached length).
- MTP speculative decoding (bench/decode_mtp.py): the trained checkpoint (`--checkpoint`, nano preset, one MTP module), greedy chat
  completions of held-out problems (up to the end-of-text id or 96 tokens) at batch 1 (one request at a time)
  and batch 16, speculative=False vs True, interleaved; decode tok/s counts the tokens after the first, over
  the steps after the prefill. The acceptance sweep spoils a share of the drafts (`Spoiler`: the MTP module's
  second choice instead of its first, output unchanged) to bring the acceptance down towards 0.8, 0.7, 0.65
  and 0.6 (b=1; b=16: the lowest). Also `small` random init at b=1, P=128 (acceptance ~0: the cost of a
  useless draft).
- where the time goes (bench/decode_profile.py): timers around the parts of a b=1, P=128 decode step
  (`--profile` adds the torch.profiler op table and the same breakdown at b=16).
Timings on a shared 2-vCPU host are noisy (+-10-15 %), and a process of someone else at full load on one core makes
2-thread OpenMP runs up to ~30x slower. Each timed section records the cores other processes used meanwhile
(/proc/stat minus this process's CPU time); with `--wait-idle S` the script waits (up to S s) for an idle machine
before each section and repeats a disturbed one (> 0.25 cores elsewhere), up to twice.
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

import torch

from nanoseek.peak import gemm_peak
from nanoseek.infer.engine import Engine

from decode_frameworks import build_hf, build_ours, hf_experts_impl, run_hf, run_ours, small_config
from decode_mtp import log_spec_table, mtp_section, spec_compare  # (bench/ is on a bench script's path)
from decode_profile import profile_decode
from hostload import Guard, bandwidth_gbs, cpu_busy_s, own_cpu_s, report_load, wait_idle

ROOT = Path(__file__).resolve().parents[1]

# (batch, prompt, decoded tokens, repetitions) for the full and the quick run, timed in this process
SHAPES = {False: [(1, 128, 48, 5), (1, 1024, 48, 3), (16, 128, 32, 3)],
          True: [(1, 128, 8, 1), (1, 1024, 8, 1), (16, 128, 4, 1)]}
# the big shape: its prefill alone takes 13-18 s per framework, so it runs once per framework, each in a fresh
# subprocess that also measures the peak RSS (a warm-up at b=16, P=16 first, outside the measured peak)
BIG = {False: (16, 1024, 16), True: (16, 256, 4)}


# ---------------------------------------------------------------------------------------------- timing
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_shapes(cfg, ours, hf, shapes, log, guard) -> list[dict]:
    rows = []
    for i, (b, P, n, reps) in enumerate(shapes):
        prompts = torch.randint(0, cfg.vocab_size, (b, P), generator=torch.Generator().manual_seed(i))
        rows.append(guard(f"b{b} P{P}", functools.partial(bench_shape, ours, hf, prompts, n, reps, log)))
    return rows


def bench_shape(ours, hf, prompts, n, reps, log) -> dict:
    """One shape: an untimed warm-up each, then `reps` interleaved repetitions; medians."""
    b, P = prompts.shape
    t_start = time.perf_counter()
    engine = Engine(ours, max_batch=b, max_len=P + n + 1, prefill_tokens=b * P)
    runs = {"ours": [], "hf": []}
    hf_prompts = prompts.to(hf.device) if hf is not None else None
    run_ours(engine, prompts, min(n, 4))  # warm-up (untimed)
    if hf is not None:
        run_hf(hf, hf_prompts, min(n, 4))
    same = None
    for _ in range(reps):
        runs["ours"].append(run_ours(engine, prompts, n))
        if hf is not None:
            runs["hf"].append(run_hf(hf, hf_prompts, n))
    row = dict(batch=b, prompt=P, new_tokens=n, reps=reps)
    for k, rs in runs.items():
        if not rs:
            continue
        row[k] = dict(decode_tok_s=median([b * n / r["decode_s"] for r in rs]),
                      decode_ms_step=median([r["decode_s"] / n * 1e3 for r in rs]),
                      prefill_tok_s=median([b * P / r["prefill_s"] for r in rs]),
                      prefill_ms=median([r["prefill_s"] * 1e3 for r in rs]))
    if hf is not None:
        # fp32 greedy on random weights: near-tied logits can flip late tokens; report the agreement
        a, h = runs["ours"][0]["tokens"], runs["hf"][0]["tokens"]
        same = sum(x == y for ra, rh in zip(a, h) for x, y in zip(ra, rh)) / sum(len(r) for r in a)
        row["greedy_token_agreement"] = same
    row["wall_s"] = time.perf_counter() - t_start
    log(f"  b={b:<3} P={P:<5} N={n:<3} reps={reps}: nanoseek {row['ours']['decode_tok_s']:.1f} tok/s"
        + (f", transformers {row['hf']['decode_tok_s']:.1f} tok/s, same tokens {same:.0%}" if hf else "")
        + f"  ({row['wall_s']:.0f} s)")
    del engine
    gc.collect()
    return row


# ---------------------------------------------------------------------------------------------- cache bytes
def hf_cache_bytes(cache, batch: int) -> dict:
    """Bytes per cached token of a DynamicCache, from its tensors (shape bytes and storage bytes)."""
    layers = getattr(cache, "layers", None)
    tensors = []
    if layers is not None:
        for layer in layers:
            tensors.append([t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                            if isinstance(t, torch.Tensor)])
    else:  # older API
        tensors = [[k, v] for k, v in zip(cache.key_cache, cache.value_cache)]
    length = cache.get_seq_length()
    per_layer = [sum(t.numel() * t.element_size() for t in ts) / (batch * length) for ts in tensors]
    storage = sum(t.untyped_storage().nbytes() for ts in tensors for t in ts) / (batch * length)
    shapes = [tuple(t.shape) for t in tensors[0]] if tensors else []
    return dict(layers=len(per_layer), per_layer=per_layer[0] if per_layer else 0, total=sum(per_layer),
                storage=storage, length=length, shapes=shapes, dtype=str(tensors[0][0].dtype) if tensors else "")


def cache_bytes(cfg, ours, hf) -> dict:
    engine = Engine(ours, max_batch=2, max_len=64)
    L = cfg.num_hidden_layers
    per_layer = [buf.shape[-1] * buf.element_size() for buf in engine.cache.layers]
    allocated = sum(buf.numel() * buf.element_size() for buf in engine.cache.layers) / (2 * 64)
    out = dict(formula_main=cfg.cache_bytes_per_token(4), ours_total=engine.cache.bytes_per_token(),
               ours_main=sum(per_layer[:L]), ours_mtp=sum(per_layer[L:]), ours_allocated_per_slot=allocated,
               hf_old_expanded_kv=L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4)
    if hf is not None:
        prompts = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
        r = run_hf(hf, prompts.to(hf.device), 7, return_cache=True)
        out["hf"] = hf_cache_bytes(r["cache"], batch=2)
    return out


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_child(kind: str, b: int, P: int, n: int) -> None:
    """One framework in a fresh process: build, warm up at (b, 16), reset the peak, time one (b, P, n) run."""
    cfg = small_config()
    prompts = torch.randint(0, cfg.vocab_size, (b, P), generator=torch.Generator().manual_seed(3))
    warm = prompts[:, :16]
    if kind == "ours":
        model = build_ours(cfg)
        engine = Engine(model, max_batch=b, max_len=P + n + 1, prefill_tokens=b * P)
        run_ours(engine, warm, 2)
    else:
        model = build_hf(cfg, None)
        run_hf(model, warm, 2)
    gc.collect()
    built = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    r = run_ours(engine, prompts, n) if kind == "ours" else run_hf(model, prompts, n)
    print(json.dumps(dict(built_mib=built / 1024, peak_mib=_status_kib("VmHWM") / 1024, reset=reset,
                          prefill_s=r["prefill_s"], decode_s=r["decode_s"], tokens=r["tokens"])))


def memory(kind: str, b: int, P: int, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--mem-shape", f"{b},{P},{n}",
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess ({kind}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def big_shape(shape, skip_hf: bool, log) -> tuple[dict, dict]:
    """The big shape, one fresh subprocess per framework: a timing row and the peak-RSS numbers."""
    b, P, n = shape
    t0 = time.perf_counter()
    mem = {"shape": [b, P, n], "ours": memory("ours", b, P, n)}
    if not skip_hf:
        mem["hf"] = memory("hf", b, P, n)
    row = dict(batch=b, prompt=P, new_tokens=n, reps=1, subprocess=True)
    for k in ("ours", "hf"):
        if k in mem:
            m = mem[k]
            row[k] = dict(decode_tok_s=b * n / m["decode_s"], decode_ms_step=m["decode_s"] / n * 1e3,
                          prefill_tok_s=b * P / m["prefill_s"], prefill_ms=m["prefill_s"] * 1e3)
    row["wall_s"] = time.perf_counter() - t0
    log(f"  b={b:<3} P={P:<5} N={n:<3} fresh process each: nanoseek {row['ours']['decode_tok_s']:.1f} tok/s"
        + (f", transformers {row['hf']['decode_tok_s']:.1f} tok/s (its own random init)" if "hf" in row else "")
        + f"  ({row['wall_s']:.0f} s)")
    for m in mem.values():
        if isinstance(m, dict):
            m.pop("tokens", None)
    return row, mem


# ---------------------------------------------------------------------------------------------- report
def code_version() -> str:
    """git describe of the checkout (with -dirty: the engine may carry uncommitted changes)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few tokens and one repetition (smoke run)")
    ap.add_argument("--skip-hf", action="store_true", help="nanoseek only")
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "nano"), help="trained run for the MTP section")
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--profile", action="store_true",
                    help="also print the torch.profiler op table of a b=1 step and the breakdown of a b=16 step")
    ap.add_argument("--no-big", action="store_true", help="skip the b=16, P=1024 shape (and the peak-RSS numbers)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each timed section wait up to S s for an idle machine; redo disturbed sections")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both frameworks (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mem-shape", default="16,1024,8", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, *map(int, args.mem_shape.split(",")))
        return

    log = functools.partial(print, flush=True)
    busy0 = wait_idle(args.wait_idle, log)
    t_all, cpu0, own0 = time.perf_counter(), cpu_busy_s(), own_cpu_s()
    results: dict = dict(argv=sys.argv[1:], quick=args.quick, other_cores_busy_at_start=busy0)
    cfg = small_config()
    import transformers

    cuda = args.device.startswith("cuda")
    if cuda:  # the CPU-only sections: peak RSS in a subprocess, the CPU checkpoint's MTP runs, the profile timers
        args.no_big, args.profile = True, False
    peak = gemm_peak(args.device)
    bw = float("nan") if cuda else bandwidth_gbs()
    results.update(torch=torch.__version__, transformers=transformers.__version__, code=code_version(),
                   threads=torch.get_num_threads(), device=args.device, gemm_peak_gflops=peak.flops / 1e9,
                   gemm_peak=str(peak), read_bandwidth_gbs=bw)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"fp32, {torch.cuda.get_device_name(args.device) if cuda else f'CPU ({os.cpu_count()} cores)'}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}; GEMM peak {peak}, read bandwidth "
        f"{bw:.1f} GB/s; other processes busy {busy0:.2f} cores at the start; nanoseek {results['code']}")
    ours = build_ours(cfg).to(args.device)
    hf = None if args.skip_hf else build_hf(cfg, ours).to(args.device)
    log(f"preset small ({cfg.num_params().total / 1e6:.0f}M params, {cfg.num_params().activated / 1e6:.0f}M "
        f"activated incl. embedding and head); transformers: attn sdpa, experts "
        f"{hf_experts_impl(hf) if hf else '-'}")

    log("\nDecode and prefill (median of interleaved repetitions):")
    guard = Guard(args.wait_idle, log)
    rows = bench_shapes(cfg, ours, hf, SHAPES[args.quick], log, guard)
    results["shapes"] = rows
    kb = cache_bytes(cfg, ours, hf)
    results["cache_bytes"] = kb

    mem = {}
    if not args.no_big:
        row, mem = guard("big shape", lambda: big_shape(BIG[args.quick], args.skip_hf, log))
        rows.append(row)
    results["memory"] = mem

    small_spec = None
    if not args.quick:
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(0, cfg.vocab_size, (128,), generator=g).tolist()]
        small_spec = guard("small speculative", lambda: spec_compare(ours, prompts, 1, 3, 32)[0])
    results["small_speculative"] = small_spec
    mtp = None if cuda else mtp_section(args.checkpoint, args.quick, log, guard)
    results["mtp"] = mtp
    prof = None if cuda else guard("profile", lambda: profile_decode(cfg, ours, 10 if args.quick else 40,
                                                                     args.profile, log))
    results["profile"] = prof
    if args.profile:
        results["profile_b16"] = guard("profile b16", lambda: profile_decode(
            cfg, ours, 4 if args.quick else 12, False, log, batch=16, P=128))

    # ------------------------------------------------------------------ tables
    log(f"\n## Decode (tok/s, small preset, fp32, {torch.get_num_threads()} threads)\n")
    log("| batch | prompt | new tok | nanoseek tok/s | ms/step | transformers tok/s | ms/step | ratio | others busy |")
    log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        key = (r["batch"], r["prompt"])
        o, h = r["ours"], r.get("hf")
        ratio = o["decode_tok_s"] / h["decode_tok_s"] if h else None
        r["decode_ratio"] = ratio
        log(f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {o['decode_tok_s']:.1f} | {o['decode_ms_step']:.1f} "
            f"| {h['decode_tok_s'] if h else float('nan'):.1f} | {h['decode_ms_step'] if h else float('nan'):.1f} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} | "
            f"{guard.record.get('big shape' if r.get('subprocess') else f'b{key[0]} P{key[1]}', float('nan')):.2f} |")

    log("\n## Prefill (tok/s; nanoseek: add() + first step; transformers: generate() entry to the first logits)\n")
    log("| batch | prompt | nanoseek tok/s | ms | transformers tok/s | ms | ratio |")
    log("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, h = r["ours"], r.get("hf")
        ratio = o["prefill_tok_s"] / h["prefill_tok_s"] if h else None
        r["prefill_ratio"] = ratio
        log(f"| {r['batch']} | {r['prompt']} | {o['prefill_tok_s']:.0f} | {o['prefill_ms']:.0f} | "
            f"{h['prefill_tok_s'] if h else float('nan'):.0f} | {h['prefill_ms'] if h else float('nan'):.0f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |")

    r1 = next((r for r in rows if r["batch"] == 1 and r["prompt"] == 128), None)
    active = cfg.num_params().activated - cfg.num_params().embedding + cfg.hidden_size  # one embedding row
    bound = bw * 1e9 / (active * 4 + kb["formula_main"] * 128)
    results["R1"] = dict(active_weight_bytes=active * 4, bound_tok_s=bound,
                         fraction=r1["ours"]["decode_tok_s"] / bound if r1 else None)
    log(f"\nb=1 P=128 bandwidth bound = {bw:.1f} GB/s / ({active * 4 / 1e6:.0f} MB weights touched "
        f"+ cache) = {bound:.0f} tok/s; nanoseek reaches "
        f"{r1['ours']['decode_tok_s'] / bound:.0%} of it" if r1 else "")

    log("\n## KV cache bytes per token (fp32)\n")
    L = cfg.num_hidden_layers
    log(f"formula (r_kv + d_r) * L * 4 = ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) * {L} * 4 = "
        f"{kb['formula_main']} B")
    log(f"nanoseek engine cache: {kb['ours_total']} B = {kb['ours_main']} B main layers + {kb['ours_mtp']} B MTP layer "
        f"(allocated {kb['ours_allocated_per_slot']:.0f} B per slot) -> main layers "
        f"{'equal to' if kb['ours_main'] == kb['formula_main'] else 'differ from'} the formula")
    if "hf" in kb:
        hk = kb["hf"]
        k1_hf = abs(hk["total"] - kb["formula_main"]) < 0.5
        log(f"transformers DynamicCache after generate: {hk['total']:.0f} B ({hk['layers']} layers x "
            f"{hk['per_layer']:.0f} B; tensors {hk['shapes']} {hk['dtype']}; storage {hk['storage']:.0f} B) -> "
            f"{'equal to' if k1_hf else 'differs from'} the formula")
    log(f"(pre-#47761 transformers cached expanded K/V: {kb['hf_old_expanded_kv']} B, "
        f"{kb['hf_old_expanded_kv'] / kb['formula_main']:.0f}x)")

    if mem:
        b, P, n = mem["shape"]
        log(f"\n## Peak memory (fresh subprocess each; b={b}, P={P}, {n} new tokens; RSS in MiB)\n")
        log("| framework | RSS after build | peak RSS during generation | peak - build |")
        log("|---|---:|---:|---:|")
        for k, name in (("ours", "nanoseek"), ("hf", "transformers")):
            if k in mem:
                m = mem[k]
                log(f"| {name} | {m['built_mib']:.0f} | {m['peak_mib']:.0f} | {m['peak_mib'] - m['built_mib']:.0f} |")
        if not all(m["reset"] for k, m in mem.items() if k != "shape"):
            log("(VmHWM could not be reset: the peak includes the build)")

    log_spec_table(mtp, small_spec, log)

    report_load(results, guard, t_all, cpu0, own0, log)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
