"""The model config files nanoseek reads, each turned into ModelConfig's (Hugging Face) field names.

    Hugging Face config.json        `model_type` deepseek_v3 / deepseek_v2, transformers v4 or v5 layout
    DeepSeek's inference config     github deepseek-ai/DeepSeek-V3 `inference/configs/*.json` (`dim`,
                                    `n_layers`, ...), the fields of `ModelArgs` in `inference/model.py`
    a nanoseek run's config.json    its "model" table holds the Hugging Face fields

The inference format leaves out what its code decides (inference/model.py @ 9b4e978):
- the gate: `score_func` sigmoid is V3's (bias, top-2 group sum, renormalized weights: noaux_tc); softmax is
  V2's (group max when n_expert_groups > 1, else greedy; weights not renormalized). DeepSeek's code gives the
  router a bias only when dim == 7168 (the released V3); nanoseek gives every sigmoid gate one.
- YaRN is on iff max_seq_len (default 16384) > original_seq_len; its `mscale` scales the softmax only, as
  mscale_all_dim does in HF's configs (cos/sin unscaled: mscale = mscale_all_dim); max_position_embeddings
  is then original_seq_len * rope_factor, as in HF's configs.
- it has no MTP module (num_nextn_predict_layers = 0) and no token ids; `dtype` / `scale_fmt` describe the
  stored weights (bf16 or FP8), not the architecture.
"""

from __future__ import annotations

import difflib

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# inference/model.py ModelArgs: every field with its default
INFERENCE_DEFAULTS = dict(
    max_batch_size=8, max_seq_len=4096 * 4, dtype="bf16", scale_fmt=None, vocab_size=102400, dim=2048,
    inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64,
    n_shared_experts=2, n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
    route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    original_seq_len=4096, rope_theta=10000.0, rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0)

# ModelArgs name -> ModelConfig name, for the fields that carry over as they are
INFERENCE_NAMES = dict(
    vocab_size="vocab_size", dim="hidden_size", inter_dim="intermediate_size", moe_inter_dim="moe_intermediate_size",
    n_layers="num_hidden_layers", n_dense_layers="first_k_dense_replace", n_heads="num_attention_heads",
    n_routed_experts="n_routed_experts", n_shared_experts="n_shared_experts", n_activated_experts="num_experts_per_tok",
    n_expert_groups="n_group", n_limited_groups="topk_group", score_func="scoring_func",
    route_scale="routed_scaling_factor", kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim",
    qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim", rope_theta="rope_theta")


def hf_fields(d: dict) -> dict:
    """A Hugging Face DeepSeek-V3 / V2 config.json dict -> ModelConfig fields (unknown keys kept: the caller
    drops them). transformers v5's `rope_parameters` and DeepseekV2Config's own defaults are resolved here."""
    d = dict(d)
    model_type = d.get("model_type", "deepseek_v3")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not a DeepSeek model; nanoseek reads {MODEL_TYPES}")
    rp = d.pop("rope_parameters", None)  # transformers v5 layout: theta and scaling in one dict
    if isinstance(rp, dict):
        rp = dict(rp)
        theta = rp.pop("rope_theta", d.get("rope_theta"))
        if theta is not None:
            d["rope_theta"] = theta
        kind = rp.pop("rope_type", rp.pop("type", "default"))
        d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    if "num_mtp_layers" in d:
        d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
    if model_type == "deepseek_v2":  # DeepseekV2Config defaults differ from V3's
        d.setdefault("topk_method", "greedy")
        d.setdefault("scoring_func", "softmax")
        d.setdefault("norm_topk_prob", False)
        d.setdefault("num_nextn_predict_layers", 0)
        for key, default in (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0)):
            if d.get(key) is None:
                d[key] = default
    return d


def inference_fields(d: dict) -> dict:
    """A DeepSeek inference config (ModelArgs fields; missing ones take ModelArgs' defaults) -> ModelConfig
    fields. Strict: a key ModelArgs does not have is an error naming the nearest one."""
    for key in d:
        if key not in INFERENCE_DEFAULTS:
            near = difflib.get_close_matches(key, INFERENCE_DEFAULTS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; its keys are {sorted(INFERENCE_DEFAULTS)}"
            raise ValueError(f"unknown key {key!r} in DeepSeek's inference config format{hint}")
    a = {**INFERENCE_DEFAULTS, **d}
    out = {new: a[old] for old, new in INFERENCE_NAMES.items()}
    sigmoid = a["score_func"] == "sigmoid"
    out.update(q_lora_rank=a["q_lora_rank"] or None,  # 0: a plain q projection (V2-Lite)
               model_type="deepseek_v3" if sigmoid else "deepseek_v2",
               topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if a["n_expert_groups"] > 1
               else "greedy",
               norm_topk_prob=sigmoid, num_nextn_predict_layers=0)
    if a["max_seq_len"] > a["original_seq_len"]:
        out["rope_scaling"] = dict(type="yarn", factor=a["rope_factor"],
                                   original_max_position_embeddings=a["original_seq_len"], beta_fast=a["beta_fast"],
                                   beta_slow=a["beta_slow"], mscale=a["mscale"], mscale_all_dim=a["mscale"])
        out["max_position_embeddings"] = int(a["original_seq_len"] * a["rope_factor"])
    else:
        out.update(rope_scaling=None, max_position_embeddings=a["max_seq_len"])
    return out


def config_fields(d: dict) -> dict:
    """Any of the three formats (detected by its keys) -> ModelConfig fields."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if isinstance(d.get("model"), dict):
        return hf_fields(d["model"])
    if "model_type" in d:
        return hf_fields(d)
    if "dim" in d or "n_layers" in d:
        return inference_fields(d)
    raise ValueError("not a model config: it has neither a 'model' table (nanoseek run config), 'model_type' "
                     f"(Hugging Face config.json: one of {MODEL_TYPES}) nor 'dim' / 'n_layers' (DeepSeek's "
                     "inference config)")
