"""The `nanoseek cost` report: the formulas of cost.py laid out as tables (text or JSON), beside the figures the
V3 paper (Table 1) and Llama 3.1 report, which are data marked "reported"; everything else is computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from nanoseek.config import PRESETS, ModelConfig, apply_overrides, fmt_count
from nanoseek.cost import (GPUS, cache_bytes_per_token, check_mfu, dense_flops_per_token, gpu_hours,
                           inference_flops_per_token, mfu, parse_count, parse_tokens, peak_flops,
                           train_flops_per_token)


# ---------------------------------------------------------------------- reported data
V3_PAPER = {  # DeepSeek-V3 Technical Report (arXiv 2412.19437), Table 1 and section 1: H800 GPU-hours at $2/hour
    "source": "DeepSeek-V3 Technical Report (arXiv 2412.19437), Table 1 and sections 1, 4.1",
    "price": 2.0, "tokens": 14.8e12, "seq_len": 4096, "gpus": 2048, "hours_per_trillion": 180e3,
    "stages": {"pre-training": (2664e3, 5.328e6), "context extension": (119e3, 0.238e6),
               "post-training": (5e3, 0.01e6)},
    "total": (2788e3, 5.576e6),
}
LLAMA31 = {
    "source": "Llama 3.1 model card (meta-llama/llama-models models/llama3_1/MODEL_CARD.md); Llama 3 paper "
              "(arXiv 2407.21783) section 1 for tokens and FLOPs",
    "params": 405e9, "tokens": 15.6e12, "flops": 3.8e25, "hours_405b": 30.84e6, "hours_family": 39.3e6,
}

# ---------------------------------------------------------------------- tables
class Row(NamedTuple):
    section: tuple[str, str]  # (JSON name, title)
    key: str  # JSON name
    label: str
    value: Any
    text: str
    mark: str  # reported / computed / measured / datasheet / input


class Table:
    """Rows in sections; `render()` aligns them as text, `to_json()` gives {section: {title, values}}."""

    def __init__(self):
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self._section = ("", "")

    def section(self, key: str, title: str) -> None:
        self._section = (key, title)

    def add(self, key: str, label: str, value, fmt=str, mark: str = "computed") -> None:
        self.rows.append(Row(self._section, key, label, value, fmt(value), mark))

    def values(self, section: str) -> dict:
        return {r.key: r.value for r in self.rows if r.section[0] == section}

    def render(self) -> str:
        wl, wv = max(len(r.label) for r in self.rows) + 2, max(len(r.text) for r in self.rows)
        out, section = [], None
        for r in self.rows:
            if r.section != section:
                out.append(("" if section is None else "\n") + r.section[1])
                section = r.section
            out.append(f"  {r.label:<{wl}}{r.text:>{wv}}  {r.mark}")
        return "\n".join(out + ([""] + self.notes if self.notes else []))

    def to_json(self) -> str:
        d: dict[str, dict] = {}
        for r in self.rows:
            group = d.setdefault(r.section[0], {"title": r.section[1], "values": {}})
            group["values"][r.key] = {"value": r.value, "text": r.text, "mark": r.mark, "label": r.label}
        return json.dumps(d, indent=2)


def _fl(x: float) -> str:
    if x >= 1e15:
        return f"{x:.3e} FLOP"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:,.0f} FLOP"


def _hours(h: float) -> str:
    if h >= 1e7:
        return f"{h / 1e6:,.2f}M"
    return f"{h / 1e3:,.0f}K" if h >= 1e5 else f"{h / 1e3:,.1f}K" if h >= 1e3 else f"{h:.3g}"


def _usd(x: float) -> str:
    return f"${x / 1e6:,.3f}M" if x >= 1e6 else f"${x:,.0f}" if x >= 100 else f"${x:.3g}"


def _rate(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _times(x: float) -> str:
    return f"{x:.1f}x"


def _days(x: float) -> str:
    return f"{x:,.1f}" if x >= 0.1 else f"{x:.3g}"


def model_rows(t: Table, cfg: ModelConfig | None, name: str, seq_len: int = 4096,
               dense_params: float | None = None, gqa_groups: int = 8) -> float:
    """Add a model's rows (or a dense model's of `dense_params` parameters); return its training FLOPs/token."""
    t.section("model", f"model: {name}")
    if cfg is None:
        f = dense_flops_per_token(dense_params)
        t.add("params", "parameters (dense: all activated)", f.matmul_params, fmt_count, "input")
        t.add("train_flops_per_token", "training FLOPs / token, 6 N (no attention term)", f.total, _fl)
        t.add("inference_flops_per_token", "inference FLOPs / token, 2 N", 2 * dense_params, _fl)
        return f.total
    p = cfg.num_params()
    f, full = train_flops_per_token(cfg, seq_len), train_flops_per_token(cfg, seq_len, causal=False)
    t.add("params_total", "parameters, total (main model)", p.total, lambda n: f"{fmt_count(n)} ({n:,})")
    t.add("params_activated", "parameters, activated per token", p.activated, lambda n: f"{fmt_count(n)} ({n:,})")
    t.add("matmul_params", "N_mm: activated matmul params (no embedding, norms)", f.matmul_params, fmt_count)
    t.add("params_mtp", f"MTP modules ({cfg.num_nextn_predict_layers}), on top", p.mtp, fmt_count)
    t.section("train_flops_per_token", f"training FLOPs / token at S = {seq_len}")
    t.add("matmul", "matmul 6 N_mm", f.matmul, _fl)
    t.add("attention_causal", "attention 6 L n_h (d_qk+d_v) S/2 (causal)", f.attention, _fl)
    t.add("total", "total (causal)", f.total, _fl)
    t.add("attention_full", "attention with S_eff = S (no causal credit)", full.attention, _fl)
    t.add("total_full", "total (no causal credit)", full.total, _fl)
    t.add("total_with_mtp", "total (causal) with the MTP modules", train_flops_per_token(cfg, seq_len, mtp=True).total,
          _fl)
    t.section("inference_flops_per_token", f"inference FLOPs / token at context T = {seq_len}")
    t.add("naive", "naive MLA: 2 N_mm + 2 L n_h (d_qk+d_v) T", inference_flops_per_token(cfg, seq_len).total, _fl)
    t.add("absorbed", "absorbed MLA: 2 N_mm + 2 L n_h (2 r_kv+d_r) T",
          inference_flops_per_token(cfg, seq_len, absorbed=True).total, _fl)
    c = cache_bytes_per_token(cfg, 2, gqa_groups)
    t.section("cache_bytes_per_token", f"cache / token, bf16, {cfg.num_hidden_layers} layers "
                                       f"(d_qk = {cfg.qk_head_dim}, d_v = {cfg.v_head_dim})")
    t.add("mla", f"MLA latent (r_kv+d_r) L 2 = {cfg.cache_dim} x L x 2", c.mla, lambda b: f"{b:,} B")
    t.add("mha", f"MHA same shape n_h (d_qk+d_v) L 2, {cfg.num_attention_heads} heads", c.mha,
          lambda b: f"{b:,} B ({b / c.mla:.1f}x MLA)")
    t.add("gqa", f"GQA same shape g (d_qk+d_v) L 2, g = {gqa_groups}", c.gqa,
          lambda b: f"{b:,} B ({b / c.mla:.2f}x MLA)")
    t.add("mla_as_gqa", "MLA = GQA with g = (r_kv+d_r) / (d_qk+d_v)", c.mla_as_gqa, "{:.2f}".format)
    t.add("mla_as_gqa_v2", "... or g = (r_kv+d_r) / (2 d_v) (V2 paper, d_h = d_v)", c.mla_as_gqa_v2, "{:.2f}".format)
    return f.total


def run_rows(t: Table, flops_per_token: float, tokens: float | None, gpu: str, precision: str | None = None,
             mfu_value: float | None = None, tokens_per_second: float | None = None, num_gpus: int = 1,
             price: float = 2.0) -> None:
    """Add the rows of training on `tokens` tokens on `num_gpus` x `gpu` at an MFU, or at a measured per-device
    throughput (which gives the MFU): total FLOPs, device-hours, days, dollars."""
    peak, precision, peak_mark = peak_flops(gpu, precision)
    dev = "CPU" if gpu == "cpu" else "GPU"
    t.section("run", f"run: {GPUS[gpu].name}, {precision} dense peak")
    t.add("peak_flops", f"peak {precision} FLOP/s per device", peak, _rate, peak_mark)
    t.notes.append(f"peak {gpu}: {GPUS[gpu].source}")
    if tokens_per_second is not None:
        mfu_value = mfu(flops_per_token, tokens_per_second, peak)
        if mfu_value > 1:
            raise ValueError(f"--tokens-per-second {tokens_per_second:g} implies MFU {mfu_value:.2f} > 1 on {gpu} "
                             f"{precision}: give the throughput of one device")
        t.add("tokens_per_second", "tokens / s per device", tokens_per_second, "{:,.1f}".format, "input")
        t.add("mfu", "MFU = F x tokens/s / peak", mfu_value, _pct)
    elif mfu_value is not None:
        t.add("mfu", "MFU", mfu_value, _pct, "input")
    if tokens is None:
        return
    t.add("tokens", "tokens", tokens, fmt_count, "input")
    t.add("total_flops", "total FLOPs = F x tokens", flops_per_token * tokens, _fl)
    if mfu_value is None:
        t.notes.append("give --mfu or --tokens-per-second for device-hours and cost")
        return
    hours = gpu_hours(flops_per_token * tokens, peak, mfu_value)
    t.add("gpu_hours", f"{dev}-hours = total / (peak x MFU x 3600)", hours, _hours)
    t.add("days", f"days on {num_gpus:,} {dev}{'s' if num_gpus > 1 else ''}", hours / num_gpus / 24, _days)
    t.add("cost", f"cost at ${price:g} per {dev}-hour", hours * price, _usd)


def paper_rows(t: Table) -> None:
    """The V3 paper's cost table next to nanoseek's first-principles numbers, and Llama 3.1 405B."""
    P, ll = V3_PAPER, LLAMA31
    t.section("v3_paper", f"DeepSeek-V3 paper, Table 1 (H800 GPU-hours, ${P['price']:g} per GPU-hour)")
    for stage, (h, usd) in P["stages"].items():
        k = stage.replace(" ", "_").replace("-", "_")
        t.add(f"{k}_hours", f"{stage}: GPU-hours", h, _hours, "reported")
        t.add(f"{k}_cost", f"{stage}: cost", usd, _usd, "reported")
    hours = sum(h for h, _ in P["stages"].values())
    t.add("total_hours_reported", "total: GPU-hours", P["total"][0], _hours, "reported")
    t.add("total_cost_reported", "total: cost", P["total"][1], _usd, "reported")
    t.add("total_hours", "total: GPU-hours (sum of the stages)", hours, _hours)
    t.add("total_cost", "total: cost = GPU-hours x price", hours * P["price"], _usd)
    t.add("hours_per_trillion", "GPU-hours per trillion tokens", P["hours_per_trillion"], _hours, "reported")
    t.add("tokens", "pre-training tokens", P["tokens"], fmt_count, "reported")
    pre = P["hours_per_trillion"] * P["tokens"] / 1e12
    t.add("pretrain_hours", "pre-training GPU-hours = 180K x 14.8", pre, _hours)
    t.add("days_per_trillion", f"days per trillion tokens on {P['gpus']:,} GPUs",
          P["hours_per_trillion"] / P["gpus"] / 24, "{:.2f}".format)
    t.add("pretrain_days", f"pre-training days on {P['gpus']:,} GPUs", pre / P["gpus"] / 24, _days)

    cfg, bf16, fp8 = ModelConfig.preset("v3-671b"), GPUS["h800"].peaks["bf16"], GPUS["h800"].peaks["fp8"]
    t.section("v3_computed", f"DeepSeek-V3 from first principles (preset v3-671b, S = {P['seq_len']}, causal, no MTP)")
    f = train_flops_per_token(cfg, P["seq_len"])
    sustained = f.total * P["tokens"] / (pre * 3600)
    t.add("params_activated", "activated parameters", cfg.num_params().activated, fmt_count)
    t.add("flops_per_token", "training FLOPs / token", f.total, _fl)
    t.add("total_flops", "pre-training FLOPs = F x 14.8T", f.total * P["tokens"], _fl)
    t.add("sustained", "sustained FLOP/s per H800 over 2,664K GPU-hours", sustained, _rate)
    t.add("mfu_bf16", f"implied MFU vs H800 bf16 dense {bf16 / 1e12:g} TFLOP/s", sustained / bf16, _pct)
    t.add("mfu_fp8", f"implied MFU vs H800 fp8 dense {fp8 / 1e12:g} TFLOP/s", sustained / fp8, _pct)
    f_mtp = train_flops_per_token(cfg, P["seq_len"], mtp=True)
    t.add("mfu_bf16_with_mtp", "implied MFU vs bf16, counting the MTP module",
          f_mtp.total * P["tokens"] / (pre * 3600) / bf16, _pct)

    t.section("llama31_405b", "Llama 3.1 405B (dense, H100-80GB)")
    total = dense_flops_per_token(ll["params"]).total * ll["tokens"]
    t.add("params", "parameters", ll["params"], fmt_count, "reported")
    t.add("tokens", "training tokens", ll["tokens"], fmt_count, "reported")
    t.add("flops_reported", "training FLOPs", ll["flops"], _fl, "reported")
    t.add("flops", "training FLOPs = 6 N x tokens", total, _fl)
    t.add("flops_ratio", "training FLOPs, 405B / V3 pre-training", total / (f.total * P["tokens"]), _times)
    t.add("hours_405b", "GPU-hours, 405B", ll["hours_405b"], _hours, "reported")
    t.add("hours_family", "GPU-hours, 8B + 70B + 405B", ll["hours_family"], _hours, "reported")
    t.add("ratio_405b", f"GPU-hours 405B / V3 total ({_hours(hours)})", ll["hours_405b"] / hours, _times)
    t.add("ratio_family", "GPU-hours 8B+70B+405B / V3 total", ll["hours_family"] / hours, _times)
    t.add("mfu_bf16", "implied MFU of 405B vs H100 bf16 dense",
          total / (ll["hours_405b"] * 3600) / GPUS["h100"].peaks["bf16"], _pct)
    t.notes += [f"reported: {P['source']}", f"reported: {ll['source']}", f"peak h800: {GPUS['h800'].source}",
                f"peak h100: {GPUS['h100'].source}"]


# ---------------------------------------------------------------------- command line
def load_config(args) -> tuple[ModelConfig | None, str]:
    """The model of `nanoseek cost`: --preset NAME, --config config.json (Hugging Face format) or
    --dense-params N (None), with key=value overrides."""
    given = [o for o, v in (("--preset", args.preset), ("--config", args.config),
                            ("--dense-params", args.dense_params)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --preset ({', '.join(sorted(PRESETS))}), --config PATH, "
                         f"--dense-params N or --paper; got {' and '.join(given) or 'none'}")
    if args.dense_params is not None:
        if args.overrides:
            raise ValueError("key=value overrides need --preset or --config, not --dense-params")
        return None, f"dense, {fmt_count(parse_count(args.dense_params, '--dense-params'))} parameters"
    if args.preset is not None:
        cfg, name = ModelConfig.preset(args.preset), f"preset {args.preset}"
    else:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            cfg = ModelConfig.from_hf_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
        name = f"config {path}"
    if args.overrides:
        cfg, name = apply_overrides(cfg, args.overrides), f"{name} {' '.join(args.overrides)}"
    return cfg, name


def main(args) -> int:
    """`nanoseek cost` (options in cli.py): print the table, or with --json the same numbers as JSON."""
    t = Table()
    if args.paper:
        extra = [o for o, v in (("--preset", args.preset), ("--config", args.config), ("--dense-params",
                 args.dense_params), ("--tokens", args.tokens), ("--gpu", args.gpu), ("--mfu", args.mfu),
                 ("--tokens-per-second", args.tokens_per_second)) if v is not None]
        if extra:
            raise ValueError(f"--paper takes no model or run options (got {', '.join(extra)})")
        paper_rows(t)
    else:
        cfg, name = load_config(args)
        dense = parse_count(args.dense_params, "--dense-params") if cfg is None else None
        tokens = parse_tokens(args.tokens) if args.tokens is not None else None
        if args.mfu is not None and args.tokens_per_second is not None:
            raise ValueError("give --mfu or --tokens-per-second, not both")
        m = check_mfu(args.mfu) if args.mfu is not None else None
        tps = parse_count(args.tokens_per_second, "--tokens-per-second") if args.tokens_per_second else None
        if not args.num_gpus > 0:
            raise ValueError(f"--num-gpus {args.num_gpus} must be a positive integer")
        if not (math.isfinite(args.price) and args.price >= 0):
            raise ValueError(f"--price {args.price} must be a non-negative number of dollars per GPU-hour")
        f = model_rows(t, cfg, name, args.seq_len, dense, args.gqa_groups)
        if tokens is not None or m is not None or tps is not None or args.gpu is not None:
            run_rows(t, f, tokens, args.gpu or "h800", args.precision, m, tps, args.num_gpus, args.price)
    print(t.to_json() if args.json else t.render())
    return 0
