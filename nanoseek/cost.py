"""Cost accounting: parameters, FLOPs per token, latent-cache bytes, MFU, GPU-hours and dollars.

Training FLOPs per token (the formula of torchtitan's `get_moe_model_nparams_and_flops`):

    F = 6 N_mm + 6 L n_h (d_qk + d_v) S_eff          S_eff = S / 2 with causal masking credited, else S

N_mm is the activated matmul parameters: what one token multiplies by (attention projections, dense FFNs,
routers, shared experts, K routed experts per MoE layer, lm_head), not the input embedding (a lookup) and
not the norm weights (elementwise). 6 = 2 FLOPs per multiply-add x (forward + 2 x backward). The attention
term is QK^T (d_qk = d_n + d_r per head) and PV (d_v per head) against S_eff keys. Not counted: softmax,
norms, RoPE, SwiGLU and other elementwise work, optimizer, and recomputation (MFU, not HFU).

MFU = F x tokens/s / peak; GPU-hours = F x tokens / (peak x MFU x 3600); the peaks
are peak.py's (datasheets on GPUs, a cached idle measurement on a CPU).
The V3 paper's Table 1 and Llama 3.1's figures are data here (`V3_PAPER`, `LLAMA31`), rechecked by `paper_check`;
`nanoseek cost` lays all of it out as tables in cost_report.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from nanoseek.config import PRESETS, ModelConfig, apply_overrides, fmt_count
from nanoseek.peak import GPUS, Peak, peak_flops


# ---------------------------------------------------------------------- FLOPs
class FlopsBreakdown(NamedTuple):
    matmul_params: int  # N_mm
    matmul: float  # 6 N_mm (training) or 2 N_mm (inference)
    attention: float
    total: float


def matmul_params(cfg: ModelConfig, mtp: bool = False) -> int:
    """N_mm: activated matmul parameters per token (see the module docstring): per block
    ModelConfig.block_params(i).matmul_activated (MLA, router, shared or dense FFN, K routed experts), plus
    lm_head V H (also when tied: it is a matmul).
    With `mtp`, each MTP module adds eh_proj 2H^2, one block (layer index L + k) and the shared head V H."""
    H, L, head = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size * cfg.hidden_size
    n = sum(cfg.block_params(i).matmul_activated for i in range(L)) + head
    if mtp:
        n += sum(2 * H * H + cfg.block_params(L + k).matmul_activated + head
                 for k in range(cfg.num_nextn_predict_layers))
    return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True, mtp: bool = False) -> FlopsBreakdown:
    """F = 6 N_mm + 6 L n_h (d_qk + d_v) S_eff, S_eff = S/2 if `causal` else S.
    `mtp=False` (default, as in the paper's comparisons) counts the main model only; `mtp=True` adds each MTP
    module's matmuls (`matmul_params`) and its attention layer, as if it ran on all S positions (it runs on
    S - k). V3 at S = 4096, causal: 6 x 36.62B + 30.7G = 250 GFLOP."""
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ValueError(f"--seq-len {seq_len} must be a positive integer")
    n = matmul_params(cfg, mtp)
    s_eff = seq_len / 2 if causal else seq_len
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    attn = 6 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * s_eff
    return FlopsBreakdown(n, 6 * n, attn, 6 * n + attn)


def inference_flops_per_token(cfg: ModelConfig, context_len: int, absorbed: bool = False) -> FlopsBreakdown:
    """Forward FLOPs of one new token attending to `context_len` cached tokens: 2 N_mm + attention, with
    attention 2 L n_h (d_qk + d_v) T for naive MLA (per-head K/V, as MHA) and 2 L n_h (2 r_kv + d_r) T for
    absorbed MLA (scores on the r_kv + d_r latent, values on the r_kv latent; DeepSeek-V2 §2.1.2). N_mm is the
    same in both: absorbing moves W_UK, W_UV from keys and values to the one query and output."""
    if not (isinstance(context_len, int) and context_len > 0):
        raise ValueError(f"--seq-len {context_len} must be a positive integer")
    n = matmul_params(cfg)
    per_head = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim if absorbed else cfg.qk_head_dim + cfg.v_head_dim
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * per_head * context_len
    return FlopsBreakdown(n, 2 * n, attn, 2 * n + attn)


def dense_flops_per_token(n_params: float, train: bool = True) -> FlopsBreakdown:
    """A dense model known only by its parameter count N: 6 N (training) or 2 N (inference), no attention
    term (its shape is not given). Llama 3.1 405B on 15.6T tokens: 6 x 405e9 x 15.6e12 = 3.79e25 FLOPs."""
    k = 6 if train else 2
    return FlopsBreakdown(int(n_params), k * n_params, 0.0, k * n_params)


# ---------------------------------------------------------------------- cache
class CacheBytes(NamedTuple):
    mla: int  # (r_kv + d_r) L bytes: the absorbed latent cache
    mha: int  # n_h (d_qk + d_v) L bytes: per-head keys (d_n + d_r) and values (d_v), same shape
    gqa: int  # g (d_qk + d_v) L bytes: g KV heads of the same shape
    gqa_groups: int
    mla_as_gqa: float  # g at which GQA (same shape) caches as much as MLA: (r_kv + d_r) / (d_qk + d_v)
    mla_as_gqa_v2: float  # the V2 paper's convention, keys and values of d_h = d_v: (r_kv + d_r) / (2 d_v)


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2, gqa_groups: int = 8) -> CacheBytes:
    """Decoding cache per token, main model (DeepSeek-V2 §2.1.4, Table 1). V3 in bf16: MLA 576 x 61 x 2 = 70,272 B;
    MHA of the same shape 128 x 320 x 61 x 2 = 4,997,120 B (71x, the naive-MLA cache); MLA = GQA with
    g = 576/320 = 1.8 KV heads of that shape, or g = 576/256 = 2.25 with the V2 paper's d_h = 128 keys."""
    if not (isinstance(gqa_groups, int) and gqa_groups > 0):
        raise ValueError(f"--gqa-groups {gqa_groups} must be a positive integer")
    per_head = (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * dtype_bytes
    return CacheBytes(cfg.cache_bytes_per_token(dtype_bytes), cfg.num_attention_heads * per_head,
                      gqa_groups * per_head, gqa_groups, cfg.cache_dim / (cfg.qk_head_dim + cfg.v_head_dim),
                      cfg.cache_dim / (2 * cfg.v_head_dim))


# ---------------------------------------------------------------------- runs
def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilization: flops_per_token x tokens_per_second / peak_flops (per device)."""
    return flops_per_token * tokens_per_second / peak_flops


def gpu_hours(total_flops: float, peak: float, mfu: float) -> float:
    """Device-hours to do `total_flops` at `mfu` of `peak` FLOP/s: total / (peak x mfu x 3600)."""
    check_mfu(mfu)
    return total_flops / (peak * mfu * 3600)


def run_compute(flops_per_token: float, tokens: float, seconds: float, devices: int = 1,
                price_per_hour: float = 2.0, peak: Peak | None = None) -> dict:
    """What a finished run used, for its report.md: FLOPs, device-hours, dollars at `price_per_hour` per
    device-hour, and MFU against the `peak` per device (when given), which it names."""
    flops, hours = flops_per_token * tokens, seconds * devices / 3600
    out = {"flops": flops, "device_hours": hours, "cost": hours * price_per_hour, "price_per_hour": price_per_hour}
    if peak:
        out["mfu"] = flops / (seconds * devices * peak.flops) if seconds > 0 else float("nan")
        out["peak"] = str(peak)
    return out


class RunEstimate(NamedTuple):
    peak: float  # dense FLOP/s per device
    precision: str
    peak_source: str  # "datasheet" or "measured"
    mfu: float | None  # given, or F x tokens/s / peak
    total_flops: float | None  # F x tokens
    hours: float | None  # device-hours = total / (peak x MFU x 3600)
    days: float | None  # of wall-clock on num_gpus devices
    cost: float | None  # hours x price


def run_estimate(flops_per_token: float, tokens: float | None, gpu: str, precision: str | None = None,
                 mfu_value: float | None = None, tokens_per_second: float | None = None, num_gpus: int = 1,
                 price: float = 2.0) -> RunEstimate:
    """Training on `tokens` tokens on `num_gpus` x `gpu` at an MFU, or at a measured per-device throughput (which
    gives the MFU): total FLOPs, device-hours, days, dollars (None where tokens or the MFU are not given)."""
    peak, precision, source = peak_flops(gpu, precision)
    if tokens_per_second is not None:
        mfu_value = mfu(flops_per_token, tokens_per_second, peak)
        if mfu_value > 1:
            raise ValueError(f"--tokens-per-second {tokens_per_second:g} implies MFU {mfu_value:.2f} > 1 on {gpu} "
                             f"{precision}: give the throughput of one device")
    total = flops_per_token * tokens if tokens is not None else None
    if total is None or mfu_value is None:
        return RunEstimate(peak, precision, source, mfu_value, total, None, None, None)
    hours = gpu_hours(total, peak, mfu_value)
    return RunEstimate(peak, precision, source, mfu_value, total, hours, hours / num_gpus / 24, hours * price)


# ---------------------------------------------------------------------- reported figures
V3_PAPER = {  # DeepSeek-V3 report (arXiv 2412.19437) §1, Table 1: H800 GPU-hours at $2/hour
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


class PaperCheck(NamedTuple):
    total_hours: float  # V3: the sum of Table 1's stages
    total_cost: float  # x $2 per GPU-hour
    pretrain_hours: float  # 180K GPU-hours per trillion tokens x 14.8T
    days_per_trillion: float  # on 2,048 GPUs
    pretrain_days: float
    params_activated: int  # V3 from first principles: preset v3-671b
    flops_per_token: float  # F at S = 4096, causal, main model
    total_flops: float  # F x 14.8T
    sustained: float  # FLOP/s per H800 over the pre-training GPU-hours
    mfu_bf16: float  # sustained / the H800's dense peak
    mfu_fp8: float
    mfu_bf16_with_mtp: float  # F counting the MTP module
    llama_flops: float  # Llama 3.1 405B: 6 N x tokens
    flops_ratio: float  # its training FLOPs / V3's pre-training FLOPs
    ratio_405b: float  # its GPU-hours / V3's total
    ratio_family: float  # GPU-hours of 8B + 70B + 405B / V3's total
    llama_mfu_bf16: float  # implied, vs the H100's dense bf16 peak


def paper_check() -> PaperCheck:
    """The V3 paper's cost table recomputed from its own figures and from the FLOPs formula, beside Llama 3.1
    405B's: V3 sustained 386 TFLOP/s per H800 (39% of the bf16 dense peak)."""
    P, ll, h800 = V3_PAPER, LLAMA31, GPUS["h800"].peaks
    hours = sum(h for h, _ in P["stages"].values())
    pre = P["hours_per_trillion"] * P["tokens"] / 1e12
    cfg = ModelConfig.preset("v3-671b")
    f = train_flops_per_token(cfg, P["seq_len"]).total
    f_mtp = train_flops_per_token(cfg, P["seq_len"], mtp=True).total
    sustained = f * P["tokens"] / (pre * 3600)
    llama = dense_flops_per_token(ll["params"]).total * ll["tokens"]
    return PaperCheck(hours, hours * P["price"], pre, P["hours_per_trillion"] / P["gpus"] / 24, pre / P["gpus"] / 24,
                      cfg.num_params().activated, f, f * P["tokens"], sustained, sustained / h800["bf16"],
                      sustained / h800["fp8"], f_mtp * P["tokens"] / (pre * 3600) / h800["bf16"], llama,
                      llama / (f * P["tokens"]), ll["hours_405b"] / hours, ll["hours_family"] / hours,
                      llama / (ll["hours_405b"] * 3600) / GPUS["h100"].peaks["bf16"])


# ---------------------------------------------------------------------- options of `nanoseek cost` and `plan`
def parse_count(text: str | float, option: str = "--tokens") -> float:
    """'14.8T' -> 14.8e12. Plain numbers ('405e9', '1000') or a K/M/B/T suffix (1e3/1e6/1e9/1e12); must be a
    positive finite number."""
    s = str(text).strip()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(s[-1:].upper(), 1.0)
    try:
        value = float(s[:-1] if scale != 1.0 else s) * scale
    except ValueError:
        raise ValueError(f"{option} {text} is not a number; give e.g. 14.8T, 500B, 2.5e9 or 1000") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} {text} must be a positive number (plain or with a K/M/B/T suffix, e.g. 14.8T)")
    return value


def parse_tokens(text: str | float, option: str = "--tokens") -> float:
    """A token count: `parse_count` for --tokens."""
    return parse_count(text, option)


def check_mfu(value: str | float, option: str = "--mfu") -> float:
    """An MFU as a fraction in (0, 1]."""
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{option} {value} is not a number; give a fraction such as 0.35") from None
    if not 0 < x <= 1:
        raise ValueError(f"{option} {value} is not in (0, 1]; give a fraction such as 0.35 (35%)")
    return x


def load_config(args) -> tuple[ModelConfig | None, str]:
    """The model of `nanoseek cost` and `nanoseek plan`: --preset NAME, --config config.json (Hugging Face format)
    or --dense-params N (None), with key=value overrides."""
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
        cfg, name = ModelConfig.from_file(args.config), f"config {Path(args.config)}"
    if args.overrides:
        cfg, name = apply_overrides(cfg, args.overrides), f"{name} {' '.join(args.overrides)}"
    return cfg, name


class CostQuery(NamedTuple):
    cfg: ModelConfig | None  # None: a dense model of dense_params parameters
    name: str
    dense_params: float | None
    seq_len: int
    gqa_groups: int
    run: bool  # a run option was given (--tokens, --mfu, --tokens-per-second or --gpu)
    tokens: float | None
    gpu: str
    precision: str | None
    mfu: float | None
    tokens_per_second: float | None
    num_gpus: int
    price: float


def cost_query(args) -> CostQuery | None:
    """The options of `nanoseek cost` (declared in cli.py), checked; None for --paper, which takes no other."""
    if args.paper:
        extra = [o for o, v in (("--preset", args.preset), ("--config", args.config), ("--dense-params",
                 args.dense_params), ("--tokens", args.tokens), ("--gpu", args.gpu), ("--mfu", args.mfu),
                 ("--tokens-per-second", args.tokens_per_second)) if v is not None]
        if extra:
            raise ValueError(f"--paper takes no model or run options (got {', '.join(extra)})")
        return None
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
    run = tokens is not None or m is not None or tps is not None or args.gpu is not None
    return CostQuery(cfg, name, dense, args.seq_len, args.gqa_groups, run, tokens, args.gpu or "h800",
                     args.precision, m, tps, args.num_gpus, args.price)
