import json

import pytest

from nanoseek import ModelConfig, Transformer
from nanoseek.config import PRESETS, apply_overrides


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_tiny_is_small_but_complete():
    cfg = ModelConfig.preset("tiny")
    p = cfg.num_params()
    assert p.total + p.mtp < 2_000_000
    assert cfg.q_lora_rank and cfg.first_k_dense_replace >= 1 and cfg.n_shared_experts >= 1
    assert 1 < cfg.topk_group < cfg.n_group and cfg.num_nextn_predict_layers >= 1 and cfg.uses_router_bias


@pytest.mark.parametrize("name", ["tiny", "nano"])
def test_analytic_counts_match_allocated(name):
    cfg = ModelConfig.preset(name)
    model = Transformer(cfg)
    p = cfg.num_params()
    main = sum(t.numel() for n, t in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(t.numel() for n, t in model.named_parameters() if n.startswith("mtp."))
    assert (main, mtp) == (p.total, p.mtp)
    # activated = total minus the routed experts a token does not use
    unused = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers()[
        : cfg.num_hidden_layers - cfg.first_k_dense_replace]) * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    assert p.activated == p.total - unused
    for i, block in enumerate(model.layers):  # per block, and each part where the module holds it alone
        want = cfg.block_params(i)
        assert sum(t.numel() for t in block.parameters()) == want.total
        assert sum(t.numel() for n, t in block.self_attn.named_parameters() if "layernorm" not in n) == want.attention
        if cfg.is_moe_layer(i):
            assert block.mlp.gate.weight.numel() == want.router
            assert block.mlp.experts.gate_up_proj.numel() + block.mlp.experts.down_proj.numel() == want.routed


def test_spec_shapes():
    nano, small = ModelConfig.preset("nano").num_params(), ModelConfig.preset("small").num_params()
    assert round(nano.total / 1e4) == 1081 and round(nano.activated / 1e4) == 727
    assert round(small.total / 1e4) == 10570 and round(small.activated / 1e4) == 5065


def test_v3_and_v2_lite_counts():
    v3 = ModelConfig.preset("v3-671b").num_params()
    assert round(v3.total / 1e9) == 671
    assert abs(v3.activated - 37e9) <= 1e9
    v2 = ModelConfig.preset("v2-lite").num_params()
    assert round(v2.total / 1e8) == 157
    assert ModelConfig.preset("v3-671b").cache_bytes_per_token(2) == 70_272


@pytest.mark.parametrize("overrides, message", [
    (dict(n_routed_experts=10), "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 is larger than the 4 experts"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2 must equal num_attention_heads=4"),
    (dict(topk_group=5), "topk_group=5 must be <= n_group=4"),
    (dict(n_routed_experts=4), "experts per group"),
    (dict(hidden_size=0), "hidden_size=0 must be a positive integer"),
    (dict(scoring_func="relu"), "scoring_func='relu' must be one of"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace=9 must be <= num_hidden_layers=3"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling.type='linear' is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 2}), "missing 'original_max_position_embeddings'"),
    (dict(eos_token_id=9999), "eos_token_id=9999 must be a token id in [0, vocab_size=512)"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
])
def test_invalid_configs_name_field_value_rule(overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        ModelConfig.preset("tiny", **overrides)
    assert message in str(err.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_dense_model_is_valid():
    cfg = ModelConfig.preset("tiny", first_k_dense_replace=3, num_nextn_predict_layers=0, n_routed_experts=0)
    assert not cfg.has_moe
    assert sum(t.numel() for t in Transformer(cfg).parameters()) == cfg.num_params().total


def test_from_released_v3_config():
    released = {  # the shape of deepseek-ai/DeepSeek-V3 config.json, with keys nanoseek ignores
        "architectures": ["DeepseekV3ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "model_type": "deepseek_v3", "aux_loss_alpha": 0.001, "ep_size": 1, "num_experts_per_tok": 8,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "max_position_embeddings": 163840, "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    }
    assert ModelConfig.from_hf_dict(released) == ModelConfig.preset("v3-671b")


def test_v5_rope_parameters_are_read():
    d = ModelConfig.preset("tiny").to_hf_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                            "original_max_position_embeddings": 64}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["factor"] == 4.0


def test_from_hf_dict_rejects_other_models():
    with pytest.raises(ValueError, match="model_type='llama' is not a DeepSeek model"):
        ModelConfig.from_hf_dict({"model_type": "llama"})


def test_overrides_are_strict():
    cfg = ModelConfig.preset("tiny")
    new = apply_overrides(cfg, ["hidden_size=128", "rope_scaling.type=yarn", "rope_scaling.factor=2",
                                "rope_scaling.original_max_position_embeddings=64", "norm_topk_prob=false",
                                "routed_scaling_factor=2"])
    assert new.hidden_size == 128 and new.rope_scaling["factor"] == 2 and new.norm_topk_prob is False
    assert new.routed_scaling_factor == 2.0
    with pytest.raises(ValueError, match="unknown field 'hiden_size' in ModelConfig; did you mean 'hidden_size'"):
        apply_overrides(cfg, ["hiden_size=3"])
    with pytest.raises(ValueError, match="norm_topk_prob=.3.: expected true or false"):
        apply_overrides(cfg, ["norm_topk_prob=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["hidden_size"])


# DeepSeek's inference configs, github deepseek-ai/DeepSeek-V3 @ 9b4e978 inference/configs/*.json, as they are
CONFIG_16B = {"vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
              "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
              "n_activated_experts": 6, "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
              "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mscale": 0.707}
CONFIG_236B = {"vocab_size": 102400, "dim": 5120, "inter_dim": 12288, "moe_inter_dim": 1536, "n_layers": 60,
               "n_dense_layers": 1, "n_heads": 128, "n_routed_experts": 160, "n_shared_experts": 2,
               "n_activated_experts": 6, "n_expert_groups": 8, "n_limited_groups": 3, "route_scale": 16.0,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128}
CONFIG_671B = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
               "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
               "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
               "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
               "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
CONFIG_V31 = {**CONFIG_671B, "scale_fmt": "ue8m0"}


def test_deepseek_inference_configs_are_the_released_models():
    from nanoseek.config import read_model_config

    lite = ModelConfig.preset("v2-lite")
    v2 = read_model_config(CONFIG_16B)
    assert v2.q_lora_rank is None and v2.rope_scaling == lite.rope_scaling  # q_lora_rank 0: a plain q_proj
    assert v2 == lite.replace(bos_token_id=0, eos_token_id=1)  # the inference format has no token ids
    p = v2.num_params()
    assert p == lite.num_params()  # 15.7B total, 2.4B activated (the V2 paper's figure leaves out the embedding)
    assert round(p.total / 1e8) == 157 and abs(p.activated - p.embedding - 2.4e9) < 0.1e9
    for config in (CONFIG_671B, CONFIG_V31):
        v3 = read_model_config(config)
        assert v3 == ModelConfig.preset("v3-671b", num_nextn_predict_layers=0)  # the inference code has no MTP
        assert round(v3.num_params().total / 1e9) == 671 and abs(v3.num_params().activated - 37e9) <= 1e9
    big = read_model_config(CONFIG_236B)
    assert (big.model_type, big.topk_method, big.n_group, big.topk_group, big.norm_topk_prob) == (
        "deepseek_v2", "group_limited_greedy", 8, 3, False)
    assert (big.q_lora_rank, big.routed_scaling_factor, big.num_hidden_layers) == (1536, 16.0, 60)
    assert round(big.num_params().total / 1e9) == 236 and round(big.num_params().activated / 1e9) == 21
    short = read_model_config({**CONFIG_16B, "max_seq_len": 4096})  # DeepSeek's YaRN only past original_seq_len
    assert short.rope_scaling is None and short.max_position_embeddings == 4096


def test_every_config_format_reads_from_a_file(tmp_path):
    from nanoseek.config import read_model_config

    nano = ModelConfig.preset("nano")
    for name, d in [("hf.json", nano.to_hf_dict()), ("run.json", {"model": nano.to_dict(), "steps": 3})]:
        (tmp_path / name).write_text(json.dumps(d))
        assert ModelConfig.from_file(tmp_path / name) == nano
    (tmp_path / "v3.json").write_text(json.dumps(CONFIG_671B))
    assert ModelConfig.from_file(tmp_path / "v3.json").hidden_size == 7168
    for d, message in [({"hello": 1}, "not a model config: it has neither a 'model' table"),
                       ({**CONFIG_671B, "n_layer": 3}, "unknown key 'n_layer' in DeepSeek's inference config format; "
                                                       "did you mean 'n_layers'?"),
                       ({"model_type": "qwen2"}, "model_type='qwen2' is not a DeepSeek model; nanoseek reads "
                                                 "('deepseek_v3', 'deepseek_v2')"),
                       ({**CONFIG_16B, "n_heads": 0}, "num_attention_heads=0 must be a positive integer")]:
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(ValueError) as err:
            read_model_config(tmp_path / "bad.json")
        assert str(err.value).startswith(f"{tmp_path / 'bad.json'}: ") and message in str(err.value)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not readable JSON"):
        ModelConfig.from_file(tmp_path / "bad.json")


def test_cost_reads_deepseek_inference_configs(tmp_path, capsys):
    from nanoseek.cli import main

    def model_values(*argv):
        assert main(["cost", *argv, "--json"]) == 0
        return {k: v["value"] for k, v in json.loads(capsys.readouterr().out)["model"]["values"].items()}

    (tmp_path / "config_671B.json").write_text(json.dumps(CONFIG_671B))
    (tmp_path / "config_16B.json").write_text(json.dumps(CONFIG_16B))
    v3 = model_values("--config", str(tmp_path / "config_671B.json"))
    assert v3["params_total"] == ModelConfig.preset("v3-671b").num_params().total
    assert v3 == model_values("--preset", "v3-671b", "num_nextn_predict_layers=0")
    lite = model_values("--config", str(tmp_path / "config_16B.json"))
    assert lite["params_total"] == ModelConfig.preset("v2-lite").num_params().total
