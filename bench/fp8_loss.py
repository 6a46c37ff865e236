"""FP8 training vs high precision: the same short run on the `nano` preset, loss curves side by side.

    python bench/fp8_loss.py              # 60 steps of 4 x 256 tokens: about 2.5 minutes on 2 CPU cores

Runs configs/nano.toml (built-in arithmetic corpus) for --steps steps with the same seed, data order and
initial weights in each precision: fp32 and precision=fp8 (V3's recipe, emulated on CPU: quantize,
dequantize, fp32 GEMM); on CUDA also bf16 autocast and fp8 under bf16 autocast (F.scaled_mm on Hopper).
A third fp32 run starts from the initial weights rounded to bf16 (a 2^-9 relative nudge): how far two
runs drift apart from a tiny perturbation alone, the noise floor of this comparison.
Prints each run's final train loss (mean of the last 10 steps' next-token loss), validation loss and median
step time, and the relative differences to the high-precision run. V3 (DeepSeek-V3 report App. B.1) reports < 0.25%
relative loss error for 16B / 230B models over ~1T tokens; minutes of a 10M-parameter model at a high
learning rate are a far shorter and noisier comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from nanoseek.train.config import load_train_config
from nanoseek.train.loop import resolve_data, train


@torch.no_grad()
def round_to_bf16(model) -> None:
    for p in model.parameters():
        p.copy_(p.bfloat16().float())


def one_run(args, out: Path, precision: str, dtype: str, init=None) -> dict:
    cfg = load_train_config(args.config, [f"steps={args.steps}", f"batch_size={args.batch}", f"out_dir={out}",
                                          "log_every=1", f"eval_every={args.steps}", f"ckpt_every={args.steps}",
                                          f"optim.warmup_steps={max(1, args.steps // 10)}",
                                          f"data.builtin_dir={args.data_dir}", f"precision={precision}",
                                          f"dtype={dtype}", f"device={args.device}", *args.overrides])
    cfg, shards, _ = resolve_data(cfg, progress=False)
    train(cfg, shards, quiet=True, init=init)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "main" in r]
    times = [cfg.tokens_per_step / r["tok_s"] for r in steps[2:]]  # without the first steps (warm-up)
    return {"losses": [r["main"] for r in steps], "final": statistics.mean(r["main"] for r in steps[-10:]),
            "val": [r["val_loss"] for r in recs if "val_loss" in r][-1], "step_ms": 1e3 * statistics.median(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/nano.toml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (the run file has 8)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default="runs/data/builtin", help="where the built-in corpus is cached")
    ap.add_argument("overrides", nargs="*", help="more TrainConfig fields as key=value (optim.lr=1e-3, ...)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    pairs = [("fp32", "fp8 (fp32 rest)", "fp32")] + ([("bf16", "fp8 (bf16 rest)", "bf16")] if cuda else [])
    noise = "fp32, init in bf16"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for high, low, dtype in pairs:
            results[high] = one_run(args, Path(tmp) / high, "default", dtype)
            results[low] = one_run(args, Path(tmp) / low, "fp8", dtype)
        results[noise] = one_run(args, Path(tmp) / "noise", "default", "fp32", init=round_to_bf16)
    cfg = load_train_config(args.config, args.overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; {args.config}: preset {cfg.preset}, {args.steps} steps "
          f"of {args.batch} x {cfg.data.seq_len} tokens, same seed, data and initial weights")
    print(f"{'run':<20}{'loss@1':>8}{'final train':>13}{'final val':>11}{'step ms':>9}{'rel. diff train':>17}"
          f"{'rel. diff val':>15}")
    rows = [(high, high) for high, _, _ in pairs] + [(low, high) for high, low, _ in pairs] + [(noise, "fp32")]
    for name, ref_name in rows:
        r, ref = results[name], results[ref_name]
        diff = "" if name == ref_name else (f"{(r['final'] - ref['final']) / ref['final']:>+17.2%}"
                                            f"{(r['val'] - ref['val']) / ref['val']:>+15.2%}")
        print(f"{name:<20}{r['losses'][0]:>8.4f}{r['final']:>13.4f}{r['val']:>11.4f}{r['step_ms']:>9.0f}{diff}")
    if cuda:
        print(f"fp8 vs bf16 step time: {results['bf16']['step_ms'] / results['fp8 (bf16 rest)']['step_ms']:.2f}x "
              f"faster")


if __name__ == "__main__":
    main()
