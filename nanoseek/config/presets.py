"""Presets as data: `ModelConfig.preset(name)` builds them."""

_TINY_COMMON = dict(
    rope_scaling=None, max_position_embeddings=2048, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1, first_k_dense_replace=1,
    n_shared_experts=1, num_attention_heads=8, initializer_range=0.02,
)

PRESETS: dict[str, dict] = {
    # < 2M parameters, every structural feature (q-LoRA, dense-first, shared + grouped routed experts, MTP)
    "tiny": dict(_TINY_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=512),
    # ~10M parameters (10.81M total, 7.27M activated, main model): the demo's model
    "nano": dict(_TINY_COMMON, vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                 num_hidden_layers=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
                 n_group=4, topk_group=2),
    # ~100M parameters (105.70M total, 50.65M activated, main model)
    "small": dict(_TINY_COMMON, vocab_size=32768, hidden_size=512, intermediate_size=1536,
                  moe_intermediate_size=256, num_hidden_layers=6, q_lora_rank=256, kv_lora_rank=128,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                  num_experts_per_tok=4, n_group=4, topk_group=2),
    # DeepSeek-V2-Lite, as its Hugging Face config.json (for counting and importing; never allocated in tests)
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                    num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                    num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
                    max_position_embeddings=163840,
                    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                    bos_token_id=100000, eos_token_id=100001),
    # the released DeepSeek-V3 shape: transformers' DeepseekV3Config defaults, plus the released config.json's
    # context length and YaRN
    "v3-671b": dict(max_position_embeddings=163840,
                    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
}


def yarn_example(original: int = 512, factor: float = 4.0) -> dict:
    """A small YaRN setting (V3's beta_fast, beta_slow and mscale; a smaller factor and original length) for
    exercising the context-extension path."""
    return dict(type="yarn", factor=factor, original_max_position_embeddings=original, beta_fast=32, beta_slow=1,
                mscale=1.0, mscale_all_dim=1.0)

