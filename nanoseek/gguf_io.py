"""GGUF both ways, with the `gguf` package: llama.cpp's `deepseek2` architecture (MLA, DeepSeekMoE, V3's
sigmoid router with its expert bias and group-limited routing).

Export (`write`; hf.export_gguf from a folder): every tensor of the main model under llama.cpp's names (gguf's TensorNameMap), in
F32, BF16, Q8_0 or Q4_0 as llama.cpp's own converter chooses: 1-D tensors, norms and the router stay F32, a
tensor whose rows the block size does not divide falls back to F16. MLA's W^UKV is written split and
transposed, as llama.cpp's absorbed attention reads it (`attn_k_b` (h, c, d_n), `attn_v_b` (h, d_v, c));
routed experts are stacked per layer (`ffn_*_exps`). The MTP module is left out (llama.cpp's deepseek2 has
none for DeepSeek). The tokenizer goes in as llama.cpp's BPE (`gpt2`) with the pre-tokenizer its regex
matches (`PRE`), and whole, as `tokenizer.huggingface.json`, with the chat template.

Import (`read`; hf.load_pretrained of a `.gguf` path, as every inference command does): the config from the file's keys,
each tensor dequantized by the gguf package, or where its blocks fit nanoseek's int4 layout (Q4_0, Q4_1:
groups of 32) moved over as they are, with no requantization. quantize "auto" keeps the file's precision:
4-bit files load as int4 (groups of 32), other quantized ones as int8 (per channel, requantized), float ones
unquantized; a Spec quantizes every target its way.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ModelConfig, fmt_count
from nanoseek.data.tokenizer import SPLIT_PATTERN, Tokenizer
from nanoseek.model import Transformer
from nanoseek.quant import Spec

ARCH = "deepseek2"
TYPES = ("f32", "bf16", "q8_0", "q4_0")  # what export writes
# llama.cpp's pre-tokenizer names -> the split regexes (applied in turn, each isolating its matches) they stand
# for, as llama.cpp's llama-vocab.cpp and DeepSeek's tokenizer.json write them
PRE = {
    "qwen2": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+"],
    "deepseek-llm": [r"[\r\n]", r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                     r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
    "deepseek-v3": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
_TAG = re.compile(r" ?</?[A-Za-z_]+>")  # nanoseek's split keeps a tag whole; llama.cpp's qwen2 split does not


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF files need the `gguf` package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------- names
def _names(cfg: ModelConfig) -> dict[str, list[str]]:
    """nanoseek state name -> the GGUF tensor(s) it becomes (kv_b: k_b and v_b; experts' gate_up: gate, up)."""
    gguf = _gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    out = {}
    for name in state:
        if name.startswith("mtp.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        hf = name if name == "lm_head.weight" else f"model.{name}"
        hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")
        if name.endswith("kv_b_proj.weight"):
            hfs = [hf.replace("kv_b_proj", "k_b_proj"), hf.replace("kv_b_proj", "v_b_proj")]
        elif name.endswith("experts.gate_up_proj"):
            hfs = [hf.replace("gate_up_proj", "gate_proj.weight"), hf.replace("gate_up_proj", "up_proj.weight")]
        elif name.endswith("experts.down_proj"):
            hfs = [hf + ".weight"]
        else:
            hfs = [hf]
        out[name] = [tmap.get_name(h, try_suffixes=(".weight", ".bias")) for h in hfs]
        if None in out[name]:
            raise ValueError(f"{name}: gguf's {ARCH} tensor map has no name for {hfs}")
    return out


def _rope_perm(d_r: int) -> torch.Tensor:
    """Rotate-half order (i, i + d_r/2 paired) -> interleaved order (2i, 2i+1 paired), as llama.cpp rotates."""
    return torch.stack([torch.arange(d_r // 2), torch.arange(d_r // 2) + d_r // 2], dim=1).flatten()


def _split(name: str, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """One nanoseek tensor (fp32) -> its GGUF tensors, in torch's dim order (ggml's reversed)."""
    h, d_n, d_r, d_v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if t.is_meta:  # shapes only
        pass
    elif not cfg.rope_interleave and name.endswith(("q_proj.weight", "q_b_proj.weight")):
        t = t.view(h, d_n + d_r, -1)
        t = torch.cat([t[:, :d_n], t[:, d_n:][:, _rope_perm(d_r)]], dim=1).flatten(0, 1)
    if not t.is_meta and not cfg.rope_interleave and name.endswith("kv_a_proj_with_mqa.weight"):
        c = cfg.kv_lora_rank
        t = torch.cat([t[:c], t[c:][_rope_perm(d_r)]])
    if name.endswith("kv_b_proj.weight"):
        kv = t.view(h, d_n + d_v, cfg.kv_lora_rank)
        return [kv[:, :d_n].transpose(1, 2), kv[:, d_n:]]
    if name.endswith("experts.gate_up_proj"):
        return list(t.chunk(2, dim=1))
    return [t]


# ---------------------------------------------------------------------------------------------- export
def _check_exportable(cfg: ModelConfig) -> None:
    why = []
    if cfg.moe_layer_freq != 1:
        why.append(f"moe_layer_freq={cfg.moe_layer_freq} (llama.cpp makes every layer after the leading dense "
                   f"ones MoE)")
    if cfg.n_shared_experts < 1:
        why.append("n_shared_experts=0 (llama.cpp's deepseek2 needs shared experts)")
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1:
        why.append("topk_method=group_limited_greedy with n_group > 1 (llama.cpp ranks groups by their top-2 "
                   "sum, V3's noaux_tc; V2 ranks them by their maximum)")
    rs = cfg.rope_scaling or {}
    if rs.get("mscale") and rs.get("mscale_all_dim") and rs["mscale"] != rs["mscale_all_dim"]:
        why.append(f"rope_scaling mscale={rs['mscale']} != mscale_all_dim={rs['mscale_all_dim']}")
    if why:
        raise ValueError(f"this model does not fit llama.cpp's {ARCH}: " + "; ".join(why))


def _pre_name(tok: Tokenizer) -> str:
    """The llama.cpp pre-tokenizer whose regexes are the tokenizer's: nanoseek's own split is qwen2's with
    tags kept whole (its tag tokens are written as user-defined tokens, which llama.cpp splits out first)."""
    spec = json.loads(tok._tok.to_str()).get("pre_tokenizer") or {}
    splits = [p for p in spec.get("pretokenizers", [spec]) if p.get("type") == "Split"]
    patterns = [(p.get("pattern") or {}).get("Regex") for p in splits]
    if patterns == [SPLIT_PATTERN]:
        return "qwen2"
    for name, regexes in PRE.items():
        if patterns == regexes:
            return name
    raise ValueError(f"the tokenizer's pre-tokenizer (split regexes {patterns}) is none llama.cpp knows by name "
                     f"({', '.join(PRE)}); GGUF stores a name, not a regex")


def _write_tokenizer(w, tok: Tokenizer, cfg: ModelConfig) -> None:
    gguf = _gguf()
    pre = _pre_name(tok)
    spec = json.loads(tok._tok.to_str())
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        t = tok._tok.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            tag = pre == "qwen2" and _TAG.fullmatch(tok.decode([i]))
            types.append(gguf.TokenType.USER_DEFINED if tag else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(bool(tok.config.get("add_bos_token", False)))
    w.add_chat_template(tok.template.source)
    w.add_string(gguf.Keys.Tokenizer.HF_JSON, tok._tok.to_str())


def _write_config(w, cfg: ModelConfig) -> None:
    gguf = _gguf()
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA as MQA over the latent (llama.cpp's absorbed attention)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    if cfg.rope_scaling:
        rs = cfg.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        if rs.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])  # llama.cpp divides by 0.1 on load
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if key in rs:
                add(rs[key])


def _qtype(gname: str, shape: tuple[int, ...], want):
    """The type a tensor is written in: llama.cpp's converter's rules."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or gname.endswith("_norm.weight") or ".ffn_gate_inp." in gname or gname.endswith(".bias"):
        return T.F32
    if want in (T.Q8_0, T.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        return T.F16
    return want


def write(cfg: ModelConfig, tokenizer: Tokenizer, name: str, out: str | Path, qtype: str,
          tensor: Callable[[str], torch.Tensor]) -> Path:
    """A model (its config, and `tensor(state name)` giving each tensor once, in turn) and its tokenizer -> one
    GGUF file (f32, bf16, q8_0 or q4_0) that llama.cpp loads as deepseek2; written to a temporary name and
    renamed, so `out` is whole or absent."""
    gguf = _gguf()
    if qtype not in TYPES:
        raise ValueError(f"--gguf {qtype!r} must be one of {', '.join(TYPES)}")
    want = getattr(gguf.GGMLQuantizationType, qtype.upper())
    _check_exportable(cfg)
    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    tensors = []  # (GGUF name, nanoseek name, part, shape, type)
    for name, gnames in _names(cfg).items():
        for k, g in enumerate(gnames):
            shape = tuple(_split(name, state[name], cfg)[k].shape)
            tensors.append((g, name, k, shape, _qtype(g, shape, want)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    _write_config(w, cfg)
    _write_tokenizer(w, tokenizer, cfg)
    for g, _, _, shape, t in tensors:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, t) if t not in (t.F32, t.F16) else shape
        dtype = {t.F32: np.float32, t.F16: np.float16}.get(t, np.uint8)
        w.add_tensor_info(g, byte_shape, np.dtype(dtype), math.prod(byte_shape) * np.dtype(dtype).itemsize, t)
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    parts = {}
    for g, name, k, shape, t in tensors:
        if k == 0:
            parts = _split(name, tensor(name).detach().float(), cfg)
        w.write_tensor_data(gguf.quants.quantize(parts[k].contiguous().numpy(), t))
    w.close()
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- import
class GGUFFile:
    """A GGUF file read with gguf's reader (memory-mapped): its keys, tensors and nanoseek config."""

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from None
        self.arch = self.get("general.architecture")
        if self.arch != ARCH:
            raise ValueError(f"{self.path}: architecture {self.arch!r} is not a DeepSeek MoE; nanoseek reads "
                             f"{ARCH!r} GGUF files")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return float(str(np.float32(value))) if isinstance(value, float) else value  # f32 keys: 1e-06, not 9.99e-07

    def arch_key(self, key: str, default=None):
        return self.get(f"{ARCH}.{key}", default)

    def config(self) -> ModelConfig:
        k = self.arch_key
        heads, rope, kv = k("attention.head_count"), k("rope.dimension_count"), k("attention.kv_lora_rank")
        gating = {1: "softmax", 2: "sigmoid"}[k("expert_gating_func", 1)]
        groups = k("expert_group_count", 1) or 1
        has_bias = any(n.endswith(".exp_probs_b.bias") for n in self.tensors)
        rope_scaling = None
        if self.arch_key("rope.scaling.type") == "yarn":
            rope_scaling = {"type": "yarn", "factor": k("rope.scaling.factor"),
                            "original_max_position_embeddings": k("rope.scaling.original_context_length")}
            if k("rope.scaling.yarn_log_multiplier") is not None:
                m = round(k("rope.scaling.yarn_log_multiplier") / 0.1, 6)
                rope_scaling |= {"mscale": m, "mscale_all_dim": m}
            for key in ("beta_fast", "beta_slow"):
                if k(f"rope.scaling.yarn_{key}") is not None:
                    rope_scaling[key] = k(f"rope.scaling.yarn_{key}")
        vocab = k("vocab_size") or len(self.get("tokenizer.ggml.tokens", []))
        return ModelConfig(
            model_type="deepseek_v3" if gating == "sigmoid" else "deepseek_v2", vocab_size=vocab,
            hidden_size=k("embedding_length"), intermediate_size=k("feed_forward_length"),
            moe_intermediate_size=k("expert_feed_forward_length"), num_hidden_layers=k("block_count"),
            first_k_dense_replace=k("leading_dense_block_count", 0), num_attention_heads=heads,
            num_key_value_heads=heads, q_lora_rank=k("attention.q_lora_rank") or None, kv_lora_rank=kv,
            qk_rope_head_dim=rope, qk_nope_head_dim=k("attention.key_length_mla") - rope,
            v_head_dim=k("attention.value_length_mla"), n_routed_experts=k("expert_count"),
            n_shared_experts=k("expert_shared_count"), num_experts_per_tok=k("expert_used_count"),
            n_group=groups, topk_group=k("expert_group_used_count", 1) or 1,
            topk_method="noaux_tc" if has_bias else ("greedy" if groups == 1 else "group_limited_greedy"),
            scoring_func=gating, norm_topk_prob=bool(k("expert_weights_norm", False)),
            routed_scaling_factor=k("expert_weights_scale", 1.0) or 1.0, num_nextn_predict_layers=0,
            max_position_embeddings=k("context_length"), rope_theta=k("rope.freq_base", 10000.0),
            rope_scaling=rope_scaling, rope_interleave=True, rms_norm_eps=k("attention.layer_norm_rms_epsilon"),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self.get("tokenizer.ggml.bos_token_id", 0), eos_token_id=self.get("tokenizer.ggml.eos_token_id", 1))

    def tokenizer(self) -> Tokenizer | None:
        """The file's tokenizer: its tokenizer.huggingface.json, else one built from its BPE tokens and merges
        with the split regexes its pre-tokenizer name stands for; the chat template from its metadata."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tokens = self.get("tokenizer.ggml.tokens")
        if tokens is None:
            return None
        raw = self.get("tokenizer.huggingface.json")
        if raw is not None:
            hf = HFTokenizer.from_str(raw)
        else:
            if self.get("tokenizer.ggml.model") != "gpt2" or self.get("tokenizer.ggml.pre") not in PRE:
                raise ValueError(f"{self.path}: tokenizer {self.get('tokenizer.ggml.model')!r} with pre-tokenizer "
                                 f"{self.get('tokenizer.ggml.pre')!r}: nanoseek reads gpt2 (byte-level BPE) "
                                 f"tokenizers with pre-tokenizer {', '.join(PRE)}")
            types = self.get("tokenizer.ggml.token_type")
            merges = [tuple(m.split(" ", 1)) for m in self.get("tokenizer.ggml.merges", [])]
            hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE[self.get("tokenizer.ggml.pre")]]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            hf.decoder = decoders.ByteLevel()
            hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                   for i, t in enumerate(types) if t == 3])  # CONTROL
        ids = lambda key: self.get(key)  # noqa: E731
        keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id"}
        config = {k: hf.id_to_token(ids(f"tokenizer.ggml.{v}")) for k, v in keys.items()
                  if ids(f"tokenizer.ggml.{v}") is not None}
        return Tokenizer(hf, None, config, (), self.get("tokenizer.chat_template"))


def _q4_blocks(raw: np.ndarray, kind) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 rows (N, bytes) -> nanoseek's int4 (q (N, K) in 0..15, s, z (N, K/32)), W = (q - 8) s + z:
    Q4_0 (d, 16 bytes: element j in the low nibble of byte j, j+16 in its high one) is W = (q - 8) d;
    Q4_1 (d, m, 16 bytes) is W = q d + m."""
    T = _gguf().GGMLQuantizationType
    N = raw.shape[0]
    head = 2 if kind == T.Q4_0 else 4
    b = torch.from_numpy(np.array(raw)).view(N, -1, head + 16)
    d = b[..., :2].contiguous().view(torch.float16).float()[..., 0]
    qs = b[..., head:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).flatten(1)
    if kind == T.Q4_0:
        return q, d, torch.zeros_like(d)
    m = b[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
    return q, d, m + 8 * d


def materialize(model: Transformer, device: torch.device) -> Transformer:
    """The meta model's tensors allocated (not initialized) on `device`, its buffers at their initial value:
    zero (the router biases, its only buffers; RoPE tables are computed on first use), overwritten where the
    checkpoint holds them. Buffers go first, for the _apply hooks that carry them over (Gate._apply)."""
    for m in model.modules():
        for name, b in list(m.named_buffers(recurse=False)):
            setattr(m, name, torch.zeros(b.shape, dtype=b.dtype, device=device))
    model = model.to_empty(device=device)
    for b in model.buffers():
        b.zero_()
    return model


def read(path: str | Path, device: str | torch.device | None = "cpu", dtype=None,
         quantize: Spec | str | None = "auto") -> tuple[Transformer, Tokenizer | None]:
    """A deepseek2 GGUF file -> (model, tokenizer) (module docstring: which tensors keep their blocks)."""
    from nanoseek.quant import QuantExperts, QuantLinear, targets
    from nanoseek.quant.load import release_freed, shells

    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    f = GGUFFile(path)
    cfg = f.config()
    names = _names(cfg)
    lost = [g for gs in names.values() for g in gs if g not in f.tensors and not g.startswith("output.")]
    if lost:
        raise ValueError(f"{f.path} lacks {len(lost)} tensors of this {cfg.summary()} model: {', '.join(lost[:6])}")
    floats = (T.F32, T.F16, T.BF16)
    stored = {name: [f.tensors[g].tensor_type for g in gs if g in f.tensors] for name, gs in names.items()}
    kinds = {k for ks in stored.values() for k in ks if k not in floats}
    auto = quantize == "auto"
    if auto:
        four = {T.Q4_0, T.Q4_1, T.Q4_K, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.Q2_K}
        quantize = None if not kinds else Spec(4, 32) if kinds & four else Spec(8)
    if quantize is not None and torch.device(device or "cpu").type != "cpu":
        raise ValueError(f"{f.path}: quantized weights run on torch's CPU kernels; device {device} is not the CPU")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and quantize is None else "cpu"))
    if dtype in (None, "auto"):  # the file's float type, bf16 (the packed kernels' fast one) if it has blocks
        by_bytes = {k: sum(t.n_bytes for t in f.tensors.values() if t.tensor_type == k) for k in floats}
        dtype = "bfloat16" if kinds else {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}[
            max(by_bytes, key=by_bytes.get)]
    if not isinstance(getattr(torch, str(dtype).removeprefix("torch."), None), torch.dtype):
        raise ValueError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    dtype = getattr(torch, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    # "auto": only what the file stores in blocks is quantized (a tensor it fell back to F16 for stays)
    keep_blocks = lambda module: not auto or all(  # noqa: E731
        k not in floats for n, ks in stored.items() if n.rpartition(".")[0] == module for k in ks)
    quantized = {} if quantize is None else {n for n in targets(model, quantize) if keep_blocks(n)}
    if quantize is not None:
        shells(model, quantize, keep_blocks)
    model = materialize(model, device)
    state = model.state_dict()
    print(f"nanoseek: loading {f.path}: {fmt_count(cfg.num_params().total)} parameters, "
          f"{quantize.name if quantize else str(dtype)[6:]}", file=sys.stderr)

    def tensor(g: str, row: int | None = None):
        """GGUF tensor g (or its row `row` of dim 0: one expert) -> fp32 torch tensor, torch's dim order."""
        t = f.tensors[g]
        data = t.data if row is None else t.data[row]
        if t.tensor_type in (T.F32, T.F16):
            return torch.from_numpy(np.array(data, dtype=np.float32))
        try:
            return torch.from_numpy(gguf.quants.dequantize(np.asarray(data), t.tensor_type).astype(np.float32))
        except NotImplementedError:
            raise ValueError(f"{f.path}: tensor {g} has type {t.tensor_type.name}, which the gguf package cannot "
                             f"dequantize") from None

    def exact_int4(gs: list[str], row: int | None):
        """q, s, z of nanoseek's int4 straight from Q4_0 / Q4_1 blocks, rows of several tensors stacked."""
        parts = [_q4_blocks(f.tensors[g].data if row is None else f.tensors[g].data[row], f.tensors[g].tensor_type)
                 for g in gs]
        return [torch.cat(p) for p in zip(*parts)]

    def assemble(name: str, gs: list[str], row: int | None = None) -> torch.Tensor:
        """The nanoseek weight `name` (one expert's with `row`) from its GGUF tensors: the inverse of _split."""
        h, d_n, d_r, d_v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        parts = [tensor(g, row) for g in gs]
        if name.endswith("kv_b_proj.weight"):
            k_b, v_b = parts
            return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(h * (d_n + d_v), cfg.kv_lora_rank)
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    with torch.no_grad():
        for name, gs in names.items():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name in quantized else None
            exact = quantize is not None and quantize.bits == 4 and quantize.group_size == 32 and all(
                f.tensors[g].tensor_type in (T.Q4_0, T.Q4_1) for g in gs)
            if isinstance(module, QuantExperts):
                for e in range(cfg.n_routed_experts):
                    if exact:
                        module.set_int4(leaf, *exact_int4(gs, e), expert=e)
                    else:
                        module.set_weight(leaf, assemble(name, gs, e), e)
                    release_freed()
            elif isinstance(module, QuantLinear):
                module.set_int4(*exact_int4(gs, None)) if exact else module.set_weight(assemble(name, gs))
            else:
                state[name].copy_(assemble(name, gs).view(state[name].shape))
            release_freed()
    return model.eval(), f.tokenizer()
