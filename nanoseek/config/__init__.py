"""ModelConfig: the DeepSeek-V3 architecture as one dataclass, with Hugging Face field names.

Field names and defaults are those of `transformers.DeepseekV3Config` (the released V3 shape), so a
`config.json` maps both ways (`from_hf_dict` / `to_hf_dict`). Three fields come from DeepSeek's own
configs and select the gate (`scoring_func`, `topk_method`) and the MoE layer stride (`moe_layer_freq`);
V2 / V2-Lite use them. Every rule is checked at construction (`ValueError` naming field, value, rule).
`read_model_config` / `ModelConfig.from_file` read any config file format nanoseek knows (formats.py).

Presets (presets.py): `tiny` (tests), `nano` (~10M parameters), `small` (~100M), `v2-lite`,
`v3-671b`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from nanoseek.config.formats import MODEL_TYPES, config_fields, hf_fields
from nanoseek.config.presets import PRESETS, yarn_example

__all__ = ["MODEL_TYPES", "PRESETS", "BlockParams", "ModelConfig", "ParamCount", "apply_overrides", "fmt_count",
           "parse_value", "read_model_config", "yarn_example"]

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 2048  # width of one routed expert; shared experts are N_s times this
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # MLA (DeepSeek-V3 report §2.1.1; DeepSeek-V2 §2.1)
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # must equal num_attention_heads (MLA has no GQA)
    q_lora_rank: int | None = 1536  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (DeepSeek-V3 report §2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"  # noaux_tc: V3 (bias, group = top-2 sum); group_limited_greedy: V2 (group max); greedy
    scoring_func: str = "sigmoid"  # sigmoid (V3) or softmax (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # MTP (DeepSeek-V3 report §2.2)
    num_nextn_predict_layers: int = 1
    # positions: RoPE on the decoupled key (DeepSeek-V3 report §2.1.1), YaRN (§4.3)
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # DeepSeek's complex-pair layout; False: rotate-half layout
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            if "type" not in self.rope_scaling and "rope_type" in self.rope_scaling:
                self.rope_scaling["type"] = self.rope_scaling.pop("rope_type")
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, rule: str):
            raise ValueError(f"{name}={getattr(self, name)!r} {rule}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or None (no q-LoRA)")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
                             f"{self.num_attention_heads}: MLA shares one latent, it has no grouped KV heads")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be <= num_hidden_layers="
                             f"{self.num_hidden_layers}")
        if self.hidden_act != "silu":
            bad("hidden_act", "is not supported: only 'silu' (SwiGLU)")
        if self.attention_bias:
            bad("attention_bias", "is not supported: DeepSeek attention has no biases")
        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"must be one of {MODEL_TYPES}")
        if not (self.rms_norm_eps > 0):
            bad("rms_norm_eps", "must be > 0")
        if not (self.initializer_range > 0):
            bad("initializer_range", "must be > 0")
        if not (self.rope_theta > 0):
            bad("rope_theta", "must be > 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            for t in (v if isinstance(v, list) else [v]):
                if t is not None and not (isinstance(t, int) and 0 <= t < self.vocab_size):
                    bad(name, f"must be a token id in [0, vocab_size={self.vocab_size})")
        if self.has_moe:
            self._validate_moe(bad)
        self._validate_rope_scaling()

    def _validate_moe(self, bad) -> None:
        E, K, G, Gk = self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group
        for name in ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer when the model has MoE layers")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"must be one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"must be one of {TOPK_METHODS}")
        if E % G:
            raise ValueError(f"n_routed_experts={E} is not divisible by n_group={G}")
        if Gk > G:
            raise ValueError(f"topk_group={Gk} must be <= n_group={G}")
        grouped = self.topk_method != "greedy"
        if self.topk_method == "noaux_tc" and E // G < 2:
            raise ValueError(f"n_routed_experts/n_group = {E}/{G} = {E // G} experts per group: noaux_tc scores a "
                             f"group by the sum of its top-2 experts, so each group needs at least 2")
        reachable = Gk * (E // G) if grouped else E
        if K > reachable:
            raise ValueError(f"num_experts_per_tok={K} is larger than the {reachable} experts that the kept groups "
                             f"hold (topk_group={Gk} x n_routed_experts/n_group={E // G})")
        if not (self.routed_scaling_factor > 0):
            bad("routed_scaling_factor", "must be > 0")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("type")
        if kind in (None, "default"):
            self.rope_scaling = None
            return
        if kind != "yarn":
            raise ValueError(f"rope_scaling.type={kind!r} is not supported: use 'yarn' or null")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in rs:
                raise ValueError(f"rope_scaling is missing {key!r} (YaRN needs factor and "
                                 f"original_max_position_embeddings)")
        if not rs["factor"] >= 1:
            raise ValueError(f"rope_scaling.factor={rs['factor']!r} must be >= 1")
        if not (isinstance(rs["original_max_position_embeddings"], int) and rs["original_max_position_embeddings"] > 0):
            raise ValueError(f"rope_scaling.original_max_position_embeddings="
                             f"{rs['original_max_position_embeddings']!r} must be a positive integer")

    # ------------------------------------------------------------------ derived (never serialized)
    @property
    def has_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP blocks continue the numbering at num_hidden_layers) is MoE, else dense."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Numbers cached per token per layer by absorbed MLA: r_kv + d_r."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def uses_router_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def cache_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """Absorbed-MLA cache per token, main model: (r_kv + d_r) * L * bytes (DeepSeek-V2 §2.1.4; V3 bf16: 70,272)."""
        return self.cache_dim * self.num_hidden_layers * bytes_per_elem

    # ------------------------------------------------------------------ counting
    def block_params(self, layer: int) -> BlockParams:
        """Parameters of decoder block `layer` (MTP blocks continue the numbering past num_hidden_layers):
        MLA  H r_q + r_q n_h d_qk (or H n_h d_qk without q-LoRA) + H (r_kv + d_r) + r_kv n_h (d_n + d_v) + n_h d_v H
        norms  2 H + r_q + r_kv;   MoE  router E H, shared N_s 3 H I_m, routed E 3 H I_m (K of them active);
        dense FFN 3 H I (counted as `ffn`)."""
        H, nh = self.hidden_size, self.num_attention_heads
        q = (H * self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim if self.q_lora_rank
             else H * nh * self.qk_head_dim)
        attention = q + H * self.cache_dim + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim) \
            + nh * self.v_head_dim * H
        norms = 2 * H + (self.q_lora_rank or 0) + self.kv_lora_rank
        if not self.is_moe_layer(layer):
            return BlockParams(attention, norms, 0, 3 * H * self.intermediate_size, 0, 0)
        expert = 3 * H * self.moe_intermediate_size
        return BlockParams(attention, norms, self.n_routed_experts * H, self.n_shared_experts * expert,
                           self.n_routed_experts * expert, self.num_experts_per_tok * expert)

    def num_params(self) -> ParamCount:
        """Analytic parameter counts (nothing is allocated), from `block_params`.

        total: every parameter of the main model (embedding, L layers, final norm, head); MTP is separate.
        activated: what one token touches: everything except the routed experts it does not pick, i.e.
        embedding + head + attention + norms + dense FFNs + routers + shared experts + K routed experts per
        MoE layer. (The router bias is a buffer, not a parameter.)
        """
        H, L = self.hidden_size, self.num_hidden_layers
        blocks = [self.block_params(i) for i in range(L)]
        embed = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        rest = embed + head + H
        # each MTP module: its block, enorm, hnorm, shared_head.norm, eh_proj
        mtp = sum(self.block_params(L + k).total + 3 * H + 2 * H * H for k in range(self.num_nextn_predict_layers))
        return ParamCount(total=sum(b.total for b in blocks) + rest, activated=sum(b.activated for b in blocks) + rest,
                          embedding=embed, head=head, mtp=mtp)

    # ------------------------------------------------------------------ presets and conversion
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict:
        """A `config.json` dict that `transformers` (v4 and v5) reads as the same model."""
        d = self.to_dict()
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        """Read a Hugging Face DeepSeek-V3 / V2 `config.json` dict. Keys nanoseek has no use for are ignored."""
        return cls._from_fields(hf_fields(d))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a config file in any format nanoseek knows (`read_model_config`)."""
        return read_model_config(path)

    @classmethod
    def _from_fields(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> str:
        p = self.num_params()
        return (f"{fmt_count(p.total)} total, {fmt_count(p.activated)} activated, "
                f"{fmt_count(p.mtp)} MTP; {self.num_hidden_layers} layers "
                f"({self.num_hidden_layers - self.first_k_dense_replace} MoE), "
                f"{self.n_routed_experts} experts top-{self.num_experts_per_tok}")


class BlockParams(NamedTuple):
    """One decoder block's parameters by part (ModelConfig.block_params)."""
    attention: int  # MLA's projection matrices
    norms: int  # its RMSNorm weights (layer, q-LoRA and latent norms)
    router: int  # MoE gate (E H); 0 for a dense block
    ffn: int  # the dense FFN, or the MoE's shared experts
    routed: int  # every routed expert
    routed_active: int  # the K routed experts one token uses

    @property
    def total(self) -> int:
        return self.attention + self.norms + self.router + self.ffn + self.routed

    @property
    def activated(self) -> int:
        return self.attention + self.norms + self.router + self.ffn + self.routed_active

    @property
    def matmul_activated(self) -> int:
        """What one token multiplies through (norms are not matmuls): the N_mm of a block."""
        return self.attention + self.router + self.ffn + self.routed_active


class ParamCount(NamedTuple):
    total: int
    activated: int
    embedding: int
    head: int
    mtp: int


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------- overrides
def parse_value(text: str, current: Any, name: str = "value") -> Any:
    """Parse `text` as a TOML literal (a bare word is a string; null/none is None) and check it against the
    type of the field's current value."""
    import tomllib

    if text in ("null", "none", "None"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={text!r}: expected true or false")
    elif isinstance(current, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name}={text!r}: expected an integer")
    elif isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name}={text!r}: expected a number")
        value = float(value)
    elif isinstance(current, str) and not isinstance(value, str):
        value = text
    return value


def apply_overrides(obj, overrides: list[str]):
    """Apply `key=value` strings to a dataclass (dotted keys reach nested dataclasses). Unknown keys raise
    an error that names the nearest field."""
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        head, _, rest = key.partition(".")
        names = [f.name for f in fields(obj)]
        if head not in names:
            nested = [f"{f.name}.{head}" for f in fields(obj) if dataclasses.is_dataclass(getattr(obj, f.name))
                      and head in {g.name for g in fields(getattr(obj, f.name))}]
            near = nested or difflib.get_close_matches(head, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown field {head!r} in {type(obj).__name__}{hint}")
        current = changes.get(head, getattr(obj, head))
        if rest:
            if dataclasses.is_dataclass(current):
                changes[head] = apply_overrides(current, [f"{rest}={text}"])
            elif isinstance(current, dict) or current is None:
                changes[head] = {**(current or {}), rest: parse_value(text, None, key)}
            else:
                raise ValueError(f"field {head!r} has no sub-fields (got {key!r})")
        else:
            changes[head] = parse_value(text, current, key)
    return dataclasses.replace(obj, **changes)


def read_model_config(source: str | Path | dict, where: str | Path | None = None) -> ModelConfig:
    """The model of a config file or its parsed dict, in any of the formats of formats.py (a Hugging Face
    config.json, DeepSeek's inference config, a nanoseek run's config.json), detected by its keys. Errors name
    the file (`where`, default the path)."""
    if isinstance(source, dict):
        d, where = source, where or "config"
    else:
        where = where or source
        if not Path(source).is_file():
            raise ValueError(f"{where}: no such file")
        try:
            d = json.loads(Path(source).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where} is not readable JSON: {e}") from None
    try:
        return ModelConfig._from_fields(config_fields(d))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
