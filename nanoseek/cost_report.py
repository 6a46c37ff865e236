"""The `nanoseek cost` tables: cost.py's formulas, run estimate and paper check as rows of a table.Table, each
value marked reported (the V3 paper, Llama 3.1), computed, measured, datasheet or input.
"""

from __future__ import annotations

from nanoseek.config import ModelConfig, fmt_count
from nanoseek.cost import (LLAMA31, V3_PAPER, CostQuery, PaperCheck, RunEstimate, cache_bytes_per_token,
                           cost_query, dense_flops_per_token, inference_flops_per_token, paper_check, run_estimate,
                           train_flops_per_token)
from nanoseek.peak import GPUS
from nanoseek.table import Table


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


_pct, _times, _bytes = "{:.1%}".format, "{:.1f}x".format, "{:,} B".format


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
        t.add("inference_flops_per_token", "inference FLOPs / token, 2 N",
              dense_flops_per_token(dense_params, train=False).total, _fl)
        return f.total
    p, both = cfg.num_params(), lambda n: f"{fmt_count(n)} ({n:,})"
    f, full = train_flops_per_token(cfg, seq_len), train_flops_per_token(cfg, seq_len, causal=False)
    t.add("params_total", "parameters, total (main model)", p.total, both)
    t.add("params_activated", "parameters, activated per token", p.activated, both)
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
    t.add("mla", f"MLA latent (r_kv+d_r) L 2 = {cfg.cache_dim} x L x 2", c.mla, _bytes)
    t.add("mha", f"MHA same shape n_h (d_qk+d_v) L 2, {cfg.num_attention_heads} heads", c.mha,
          lambda b: f"{b:,} B ({b / c.mla:.1f}x MLA)")
    t.add("gqa", f"GQA same shape g (d_qk+d_v) L 2, g = {gqa_groups}", c.gqa,
          lambda b: f"{b:,} B ({b / c.mla:.2f}x MLA)")
    t.add("mla_as_gqa", "MLA = GQA with g = (r_kv+d_r) / (d_qk+d_v)", c.mla_as_gqa, "{:.2f}".format)
    t.add("mla_as_gqa_v2", "... or g = (r_kv+d_r) / (2 d_v) (V2 paper, d_h = d_v)", c.mla_as_gqa_v2, "{:.2f}".format)
    return f.total


def run_rows(t: Table, q: CostQuery, r: RunEstimate) -> None:
    """Add the rows of a run estimate: peak, MFU, total FLOPs, device-hours, days, dollars."""
    dev = "CPU" if q.gpu == "cpu" else "GPU"
    t.section("run", f"run: {GPUS[q.gpu].name}, {r.precision} dense peak")
    t.add("peak_flops", f"peak {r.precision} FLOP/s per device", r.peak, _rate, r.peak_source)
    t.notes.append(f"peak {q.gpu}: {GPUS[q.gpu].source}")
    if q.tokens_per_second is not None:
        t.add("tokens_per_second", "tokens / s per device", q.tokens_per_second, "{:,.1f}".format, "input")
        t.add("mfu", "MFU = F x tokens/s / peak", r.mfu, _pct)
    elif r.mfu is not None:
        t.add("mfu", "MFU", r.mfu, _pct, "input")
    if q.tokens is None:
        return
    t.add("tokens", "tokens", q.tokens, fmt_count, "input")
    t.add("total_flops", "total FLOPs = F x tokens", r.total_flops, _fl)
    if r.hours is None:
        t.notes.append("give --mfu or --tokens-per-second for device-hours and cost")
        return
    t.add("gpu_hours", f"{dev}-hours = total / (peak x MFU x 3600)", r.hours, _hours)
    t.add("days", f"days on {q.num_gpus:,} {dev}{'s' if q.num_gpus > 1 else ''}", r.days, _days)
    t.add("cost", f"cost at ${q.price:g} per {dev}-hour", r.cost, _usd)


def paper_rows(t: Table, c: PaperCheck) -> None:
    """The V3 paper's cost table next to nanoseek's first-principles numbers, and Llama 3.1 405B."""
    P, ll, h800 = V3_PAPER, LLAMA31, GPUS["h800"].peaks
    t.section("v3_paper", f"DeepSeek-V3 paper, Table 1 (H800 GPU-hours, ${P['price']:g} per GPU-hour)")
    for stage, (h, usd) in P["stages"].items():
        k = stage.replace(" ", "_").replace("-", "_")
        t.add(f"{k}_hours", f"{stage}: GPU-hours", h, _hours, "reported")
        t.add(f"{k}_cost", f"{stage}: cost", usd, _usd, "reported")
    t.add("total_hours_reported", "total: GPU-hours", P["total"][0], _hours, "reported")
    t.add("total_cost_reported", "total: cost", P["total"][1], _usd, "reported")
    t.add("total_hours", "total: GPU-hours (sum of the stages)", c.total_hours, _hours)
    t.add("total_cost", "total: cost = GPU-hours x price", c.total_cost, _usd)
    t.add("hours_per_trillion", "GPU-hours per trillion tokens", P["hours_per_trillion"], _hours, "reported")
    t.add("tokens", "pre-training tokens", P["tokens"], fmt_count, "reported")
    t.add("pretrain_hours", "pre-training GPU-hours = 180K x 14.8", c.pretrain_hours, _hours)
    t.add("days_per_trillion", f"days per trillion tokens on {P['gpus']:,} GPUs", c.days_per_trillion, "{:.2f}".format)
    t.add("pretrain_days", f"pre-training days on {P['gpus']:,} GPUs", c.pretrain_days, _days)

    t.section("v3_computed", f"DeepSeek-V3 from first principles (preset v3-671b, S = {P['seq_len']}, causal, no MTP)")
    t.add("params_activated", "activated parameters", c.params_activated, fmt_count)
    t.add("flops_per_token", "training FLOPs / token", c.flops_per_token, _fl)
    t.add("total_flops", "pre-training FLOPs = F x 14.8T", c.total_flops, _fl)
    t.add("sustained", "sustained FLOP/s per H800 over 2,664K GPU-hours", c.sustained, _rate)
    t.add("mfu_bf16", f"implied MFU vs H800 bf16 dense {h800['bf16'] / 1e12:g} TFLOP/s", c.mfu_bf16, _pct)
    t.add("mfu_fp8", f"implied MFU vs H800 fp8 dense {h800['fp8'] / 1e12:g} TFLOP/s", c.mfu_fp8, _pct)
    t.add("mfu_bf16_with_mtp", "implied MFU vs bf16, counting the MTP module", c.mfu_bf16_with_mtp, _pct)

    t.section("llama31_405b", "Llama 3.1 405B (dense, H100-80GB)")
    t.add("params", "parameters", ll["params"], fmt_count, "reported")
    t.add("tokens", "training tokens", ll["tokens"], fmt_count, "reported")
    t.add("flops_reported", "training FLOPs", ll["flops"], _fl, "reported")
    t.add("flops", "training FLOPs = 6 N x tokens", c.llama_flops, _fl)
    t.add("flops_ratio", "training FLOPs, 405B / V3 pre-training", c.flops_ratio, _times)
    t.add("hours_405b", "GPU-hours, 405B", ll["hours_405b"], _hours, "reported")
    t.add("hours_family", "GPU-hours, 8B + 70B + 405B", ll["hours_family"], _hours, "reported")
    t.add("ratio_405b", f"GPU-hours 405B / V3 total ({_hours(c.total_hours)})", c.ratio_405b, _times)
    t.add("ratio_family", "GPU-hours 8B+70B+405B / V3 total", c.ratio_family, _times)
    t.add("mfu_bf16", "implied MFU of 405B vs H100 bf16 dense", c.llama_mfu_bf16, _pct)
    t.notes += [f"reported: {P['source']}", f"reported: {ll['source']}", f"peak h800: {GPUS['h800'].source}",
                f"peak h100: {GPUS['h100'].source}"]


def main(args) -> int:
    """`nanoseek cost` (options in cli.py): print the table, or with --json the same numbers as JSON."""
    t, q = Table(), cost_query(args)
    if q is None:
        paper_rows(t, paper_check())
    else:
        f = model_rows(t, q.cfg, q.name, q.seq_len, q.dense_params, q.gqa_groups)
        if q.run:
            run_rows(t, q, run_estimate(f, q.tokens, q.gpu, q.precision, q.mfu, q.tokens_per_second, q.num_gpus,
                                        q.price))
    print(t.to_json() if args.json else t.render())
    return 0
