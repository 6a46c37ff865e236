"""nanoseek -> Hugging Face folder -> transformers: same logits, same tokens, same greedy text; and back."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import generate
from nanoseek.infer.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shard_gb", [5.0, 1e-4])
def test_export_round_trip(tiny_run, tmp_path, shard_gb):
    run, _ = tiny_run
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--max-shard-gb", str(shard_gb)]) == 0
    ours = load_pretrained(run)
    biases = [m.gate.e_score_correction_bias for m in ours.model.moe_layers()]
    assert min(float(b.min()) for b in biases) < 0  # trained biases go negative; the export shifts them
    exported = load_pretrained(out).model.moe_layers()
    assert min(float(m.gate.e_score_correction_bias.min()) for m in exported) >= 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids = torch.randint(0, ours.model.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours.model(ids).logits, atol=1e-4, rtol=0)
    if shard_gb < 1:
        assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    # tokenizer and chat template
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "12+34= <think>a</think> 二加二 🎉"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.tokenizer.encode(text)
    messages = [{"role": "user", "content": "47+38="}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert chat == ours.tokenizer.apply_chat(messages)
    conversation = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "85"},
                    {"role": "user", "content": "and 1+1="}]  # the template's system rule = render_chat's
    assert tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"] == ours.tokenizer.apply_chat(conversation)
    # transformers' greedy generate = ours
    want = generate(ours.model, [chat], SamplingParams(max_tokens=12))[0]
    got = ref.generate(torch.tensor([chat]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(chat):]
    assert got.tolist() == want
    # and back into nanoseek
    back = load_pretrained(out).model
    torch.testing.assert_close(back(ids).logits, ours.model(ids).logits, atol=1e-5, rtol=0)


V2_LITE_SHAPED = dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy", scoring_func="softmax",
                      norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)


@pytest.mark.parametrize("arch, overrides", [("DeepseekV3", {}), ("DeepseekV2", V2_LITE_SHAPED)])
def test_a_checkpoint_saved_by_transformers_loads(tmp_path, arch, overrides):
    from nanoseek import ModelConfig

    cfg = ModelConfig.preset("tiny", **overrides)
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, f"{arch}Config")(**cfg.to_hf_dict())
    hf = getattr(transformers, f"{arch}ForCausalLM")(hf_cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).model
    assert ours.config.num_nextn_predict_layers == 0  # transformers keeps no MTP module
    assert ours.config.model_type == cfg.model_type
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_bad_folders_get_clear_errors(tmp_path, tiny_run):
    run, _ = tiny_run
    out = tmp_path / "hf"
    main(["export", str(run), str(out)])
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle checkpoints, which nanoseek never loads"):
        load_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama' is not a DeepSeek model"):
        load_pretrained(out)


def test_an_exported_folder_fine_tunes_and_a_missing_shard_is_named(tiny_run, shard_dir, tmp_path):
    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import resolve_data, train

    run, _ = tiny_run
    out = tmp_path / "hf"
    main(["export", str(run), str(out), "--max-shard-gb", "1e-4"])
    cfg = load_train_config(None, [f"init={out}", f"data.path={shard_dir}", f"out_dir={tmp_path / 'sft'}",
                                   "data.loss_on=assistant", "steps=2", "batch_size=2", "data.seq_len=32",
                                   "eval_every=2", "eval_batches=1", "ckpt_every=2"])
    cfg, shards, _ = resolve_data(cfg)
    train(cfg, shards, quiet=True)  # nanoseek sft from a Hugging Face folder
    assert load_pretrained(tmp_path / "sft").model.config == load_pretrained(out).model.config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (out / missing).unlink()
    with pytest.raises(ValueError, match=f"has no {missing}"):
        load_pretrained(out)


def test_a_deepseek_folder_round_trips_with_its_tokenizer(deepseek_folder, tmp_path):
    """export of a user's folder keeps its tokenizer files, special tokens and template; the weights stay bf16 and
    equal, and transformers reads the result."""
    out = tmp_path / "out"
    assert main(["export", str(deepseek_folder), str(out)]) == 0
    a, b = load_pretrained(deepseek_folder), load_pretrained(out)
    assert next(b.model.parameters()).dtype == torch.bfloat16
    for (key, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        if key.endswith("e_score_correction_bias"):  # shifted to a minimum of 0: the same selection
            x, y = x - x.min(), y - y.min()
        assert torch.equal(x, y), key
    assert b.tokenizer.template.source == a.tokenizer.template.source
    assert (b.tokenizer.special_tokens, b.tokenizer.stop_ids) == (a.tokenizer.special_tokens, a.tokenizer.stop_ids)
    ref = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    assert ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"] == b.tokenizer.apply_chat(messages)
