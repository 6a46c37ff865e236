import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from nanoseek.hf import load_pretrained


def logits(model, ids=((0, 7, 8, 9, 10, 11),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_run_and_checkpoint_directories_load_the_trained_weights(tiny_run):
    run, model = tiny_run
    for path in (run, run / "checkpoints" / "step_000004"):
        pre = load_pretrained(path)
        assert pre.name == "tiny" and pre.weights.name == "step_000004"
        assert pre.tokenizer is not None and pre.tokenizer.vocab_size <= pre.model.config.vocab_size
        torch.testing.assert_close(logits(pre.model), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("sharded", [False, True])
def test_hugging_face_directory(tiny_run, tmp_path, sharded):
    run, model = tiny_run
    sd = {k: v.clone() for k, v in model.hf_state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    shutil.copy(run / "tokenizer.json", tmp_path)
    if sharded:
        keys = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in parts.items():
            save_file({k: sd[k] for k in ks}, tmp_path / name)
        index = {"weight_map": {k: name for name, ks in parts.items() for k in ks}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, tmp_path / "model.safetensors")
    torch.testing.assert_close(logits(load_pretrained(tmp_path).model), logits(model), rtol=0, atol=0)


def test_bad_directories_say_what_is_wrong(tiny_run, tmp_path):
    run, _ = tiny_run
    with pytest.raises(ValueError, match="is not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither a 'model' table"):
        load_pretrained(tmp_path)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    shutil.copy(run / "config.json", empty_run)
    with pytest.raises(ValueError, match="holds no checkpoint yet"):
        load_pretrained(empty_run)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_pretrained(broken)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_other_model_types_are_refused_naming_the_file(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 64}))
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'config.json'}: model_type={model_type!r} is not a DeepSeek model; "
                              f"nanoseek reads ('deepseek_v3', 'deepseek_v2')")


def sharded_folder(tmp_path):
    from tests.test_load import save_hf, tiny_model

    save_hf(tiny_model(), tmp_path, shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    return index["weight_map"]


def rewrite(file, change):
    from safetensors.torch import load_file

    sd = load_file(file)
    change(sd)
    save_file(sd, file)


def test_bad_checkpoints_name_the_file_and_the_tensor(tmp_path):
    weight_map = sharded_folder(tmp_path)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    shard = tmp_path / weight_map[key]
    saved = shard.read_bytes()
    shard.unlink()
    with pytest.raises(ValueError, match=f"{tmp_path} has no {shard.name}, which model.safetensors.index.json names"):
        load_pretrained(tmp_path)
    shard.write_bytes(saved[:-100])
    with pytest.raises(ValueError, match=f"{shard} is corrupt or truncated: its header describes \\d+ bytes, the "
                                         f"file has {len(saved) - 100}"):
        load_pretrained(tmp_path)
    shard.write_bytes(saved[:8] + b"x" + saved[9:])
    with pytest.raises(ValueError, match=f"{shard} is corrupt or truncated: its header is not JSON"):
        load_pretrained(tmp_path)
    shard.write_bytes(saved)
    rewrite(shard, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=f"model.safetensors.index.json places 1 tensors in shards that do not hold "
                                         f"them, e.g. '{key}' in {shard}"):
        load_pretrained(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != key}}))
    with pytest.raises(ValueError, match=f"{tmp_path}: checkpoint does not fit this model .*: missing keys \\(1\\): "
                                         f"{key}$"):
        load_pretrained(tmp_path)
    shard.write_bytes(saved)
    rewrite(shard, lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=f"unexpected keys \\(1\\): model.layers.0.self_attn.extra.weight "
                                         f"\\({shard.name}\\)"):
        load_pretrained(tmp_path)
    shard.write_bytes(saved)
    rewrite(shard, lambda sd: sd.update({key: torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=f"wrong shapes \\(1\\): {key}: checkpoint \\(3, 3\\) vs model"):
        load_pretrained(tmp_path)


def test_a_deepseek_inference_config_is_read(tmp_path):
    """A folder whose config.json is in DeepSeek's inference format (inference/configs/*.json) and whose weights
    are in Hugging Face's names loads; its model has no MTP module (that format has none)."""
    from tests.test_load import save_hf, tiny_model

    model = tiny_model(num_nextn_predict_layers=0)
    save_hf(model, tmp_path)
    c = model.config
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, inter_dim=c.intermediate_size, moe_inter_dim=c.moe_intermediate_size,
        n_layers=c.num_hidden_layers, n_dense_layers=c.first_k_dense_replace, n_heads=c.num_attention_heads,
        n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
        n_activated_experts=c.num_experts_per_tok, n_expert_groups=c.n_group, n_limited_groups=c.topk_group,
        route_scale=c.routed_scaling_factor, score_func="sigmoid", q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, max_seq_len=c.max_position_embeddings, dtype="bf16")))
    pre = load_pretrained(tmp_path)
    assert pre.model.config == c
    assert pre.model.embed_tokens.weight.dtype == torch.bfloat16  # "dtype": "bf16"
    torch.testing.assert_close(logits(pre.model).float(), logits(model.bfloat16()).float(), rtol=0, atol=0)
