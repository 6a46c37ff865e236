"""GGUF both ways (nanoseek/gguf_io.py): exact f32 and Q8_0 round trips, Q4_0 blocks loaded as int4 without
requantizing, K-quants against the gguf package's own dequantization, the keys llama.cpp's deepseek2 reads,
clear errors, and (when llama-cpp-python is installed) llama.cpp's greedy tokens equal to nanoseek's."""

import numpy as np
import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.gguf_io import GGUFFile, _names, _split, _write_config, _write_tokenizer
from nanoseek.hf import export_gguf, load_pretrained
from nanoseek.quant import QuantExperts, QuantLinear
from tests.conftest import tiny_model
from tests.test_load import save_hf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TEXTS = [f"{a}+{b}=<answer>{a + b}</answer> the sum" for a in range(200) for b in range(0, 200, 9)]


def make_folder(out, **overrides):
    model = tiny_model(**overrides)
    save_hf(model, out)
    Tokenizer.train(TEXTS, model.config.vocab_size, out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("gguf") / "tiny")


def main_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_f32_round_trip_is_exact(folder, tmp_path):
    ref = load_pretrained(folder, dtype="float32").model
    back = load_pretrained(export_gguf(folder, tmp_path / "m.gguf", "f32"), dtype="float32")
    assert back.model.config.num_nextn_predict_layers == 0  # llama.cpp's deepseek2 has no MTP: left out
    want, got = main_state(ref), back.model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = torch.randint(0, 512, (2, 19))
    assert torch.equal(logits(back.model, ids), logits(ref, ids))
    text = "12+34=<answer>46</answer>"
    assert back.tokenizer.encode(text) == Tokenizer.load(folder).encode(text)
    assert back.tokenizer.template.source == Tokenizer.load(folder).template.source


def test_rotate_half_rope_is_written_interleaved(tmp_path):
    """A rope_interleave=False model is written in llama.cpp's (interleaved) order and reads back as the same
    function."""
    src = make_folder(tmp_path / "neox", rope_interleave=False)
    ref = load_pretrained(src, dtype="float32").model
    back = load_pretrained(export_gguf(src, tmp_path / "m.gguf", "f32"), dtype="float32").model
    assert back.config.rope_interleave
    ids = torch.randint(0, 512, (1, 23))
    torch.testing.assert_close(logits(back, ids), logits(ref, ids), atol=1e-5, rtol=1e-5)


def file_tensors(path) -> dict[str, tuple]:
    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFFile(path).reader.tensors}


def test_q8_0_round_trip_is_exact(folder, tmp_path):
    first = export_gguf(folder, tmp_path / "a.gguf", "q8_0")
    pre = load_pretrained(first, dtype="float32", quantize="none")  # every block dequantized
    from nanoseek import gguf_io

    second = gguf_io.write(pre.model.config, pre.tokenizer, "again", tmp_path / "b.gguf", "q8_0",
                           pre.model.state_dict().__getitem__)
    a, b = file_tensors(first), file_tensors(second)
    assert a.keys() == b.keys() and T.Q8_0 in {t for t, _ in a.values()}
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][1], b[name][1]), name


def test_export_streams_from_the_files(tmp_path):
    """export_gguf reads each tensor from the (sharded, bf16) checkpoint as it writes it: the same file as
    writing the loaded model."""
    from nanoseek import gguf_io

    src = tmp_path / "sharded"
    save_hf(tiny_model(), src, dtype=torch.bfloat16, shard_bytes=50_000)
    Tokenizer.train(TEXTS, 512, src)
    streamed = file_tensors(export_gguf(src, tmp_path / "a.gguf", "q8_0"))
    pre = load_pretrained(src, dtype="float32")
    loaded = file_tensors(gguf_io.write(pre.model.config, pre.tokenizer, "sharded", tmp_path / "b.gguf", "q8_0",
                                        pre.model.state_dict().__getitem__))
    assert streamed.keys() == loaded.keys()
    for name in loaded:
        assert np.array_equal(streamed[name][1], loaded[name][1]), name


def test_llama_cpp_keys_and_names(folder, tmp_path):
    f = GGUFFile(export_gguf(folder, tmp_path / "m.gguf", "q4_0"))
    cfg = load_pretrained(folder).model.config
    k = f.arch_key
    assert f.get("general.architecture") == "deepseek2" and f.get("general.file_type") == 2  # MOSTLY_Q4_0
    assert k("expert_gating_func") == 2  # sigmoid
    assert (k("expert_group_count"), k("expert_group_used_count")) == (cfg.n_group, cfg.topk_group)
    assert (k("expert_weights_scale"), k("expert_weights_norm")) == (cfg.routed_scaling_factor, True)
    assert k("leading_dense_block_count") == cfg.first_k_dense_replace and k("attention.head_count_kv") == 1
    assert (k("attention.key_length"), k("attention.value_length")) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                                                       cfg.kv_lora_rank)
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for i in moe:  # noaux_tc: the expert bias, F32
        assert f.tensors[f"blk.{i}.exp_probs_b.bias"].tensor_type == T.F32
        assert f.tensors[f"blk.{i}.ffn_gate_inp.weight"].tensor_type == T.F32
        assert list(f.tensors[f"blk.{i}.ffn_gate_exps.weight"].shape) == [cfg.hidden_size, cfg.moe_intermediate_size,
                                                                          cfg.n_routed_experts]
    h, c = cfg.num_attention_heads, cfg.kv_lora_rank
    assert list(f.tensors["blk.0.attn_k_b.weight"].shape) == [cfg.qk_nope_head_dim, c, h]  # ggml's dim order
    assert list(f.tensors["blk.0.attn_v_b.weight"].shape) == [c, cfg.v_head_dim, h]
    assert f.tensors["blk.0.attn_q_b.weight"].tensor_type == T.Q4_0
    assert f.tensors["blk.0.attn_k_b.weight"].tensor_type == T.F16  # rows of 16: no Q4_0 block fits
    assert f.get("tokenizer.ggml.model") == "gpt2" and f.get("tokenizer.ggml.pre") == "qwen2"
    tokens, types = f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type")
    assert len(tokens) == cfg.vocab_size and types[0] == 3  # <|begin_of_text|>: control
    assert types[tokens.index("<think>")] == 4  # added, not special: user-defined
    assert f.get("tokenizer.huggingface.json") and f.get("tokenizer.chat_template")


def test_q4_0_blocks_load_as_int4_unchanged(folder, tmp_path):
    path = export_gguf(folder, tmp_path / "m.gguf", "q4_0")
    f = GGUFFile(path)
    model = load_pretrained(path, dtype="float32").model  # quantize None: the file's blocks, kept
    cfg = model.config
    q_b = model.layers[0].self_attn.q_b_proj
    assert isinstance(q_b, QuantLinear) and q_b.spec.group_size == 32
    want = gguf.quants.dequantize(np.array(f.tensors["blk.0.attn_q_b.weight"].data), T.Q4_0)
    assert torch.equal(q_b.dequantize(), torch.from_numpy(want))
    experts = model.layers[1].mlp.experts
    assert isinstance(experts, QuantExperts)
    gate = gguf.quants.dequantize(np.array(f.tensors["blk.1.ffn_gate_exps.weight"].data), T.Q4_0)
    up = gguf.quants.dequantize(np.array(f.tensors["blk.1.ffn_up_exps.weight"].data), T.Q4_0)
    assert torch.equal(experts.dequantize("gate_up_proj"), torch.from_numpy(np.concatenate([gate, up], axis=1)))
    assert not isinstance(model.layers[0].self_attn.kv_b_proj, QuantLinear)  # kept (quant.KEEP)
    dequantized = load_pretrained(path, dtype="float32", quantize="none").model
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    torch.testing.assert_close(logits(model, ids), logits(dequantized, ids), atol=1e-4, rtol=1e-4)


def random_blocks(kind, rows: int, cols: int, rng) -> np.ndarray:
    """Random but valid K-quant blocks: random bytes, with finite, small f16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = (rng.random((rows, cols // block, 2)) * 0.01 + 0.001).astype(np.float16).view(np.uint8)
    if kind == T.Q4_K:  # d, dmin first
        raw[..., :4] = scales
    else:  # Q6_K: d last
        raw[..., -2:] = scales[..., :2]
    return raw.reshape(rows, -1)


def k_quant_file(src, out, kind):
    """The GGUF nanoseek writes at f32, with every 2-D weight whose rows hold whole 256-blocks replaced by
    random `kind` blocks (the gguf package writes no K-quants itself)."""
    pre = load_pretrained(src, dtype="float32")
    cfg, state, rng = pre.model.config, pre.model.state_dict(), np.random.default_rng(0)
    w = gguf.GGUFWriter(out, "deepseek2")
    _write_config(w, cfg)
    _write_tokenizer(w, pre.tokenizer, cfg)
    for name, gnames in _names(cfg).items():
        for g, part in zip(gnames, _split(name, state[name].float(), cfg)):
            x = part.contiguous().numpy()
            if x.ndim >= 2 and x.shape[-1] % 256 == 0 and "ffn_gate_inp" not in g:
                rows = int(np.prod(x.shape[:-1]))
                raw = random_blocks(kind, rows, x.shape[-1], rng).reshape(*x.shape[:-1], -1)
                w.add_tensor(g, raw, raw_dtype=kind)
            else:
                w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("kind,bits", [(T.Q4_K, 4), (T.Q6_K, 8)])
def test_k_quants_load_as_the_gguf_package_dequantizes_them(tmp_path, kind, bits):
    src = make_folder(tmp_path / "wide", hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                      q_lora_rank=256, kv_lora_rank=256, num_attention_heads=2, v_head_dim=128)
    path = k_quant_file(src, tmp_path / "k.gguf", kind)
    f = GGUFFile(path)
    want = torch.from_numpy(gguf.quants.dequantize(np.array(f.tensors["blk.1.attn_output.weight"].data), kind))
    plain = load_pretrained(path, dtype="float32", quantize="none").model
    assert torch.equal(plain.layers[1].self_attn.o_proj.weight, want)
    gate = gguf.quants.dequantize(np.array(f.tensors["blk.1.ffn_gate_exps.weight"].data), kind)
    assert torch.equal(plain.layers[1].mlp.experts.gate_up_proj[:, :256], torch.from_numpy(gate))
    packed = load_pretrained(path, dtype="float32").model  # 4-bit blocks: int4 g32; 6-bit: int8
    o_proj = packed.layers[1].self_attn.o_proj
    assert isinstance(o_proj, QuantLinear) and o_proj.spec.bits == bits
    err = (o_proj.dequantize() - want).abs().max()
    assert err <= want.abs().max() / (7 if bits == 4 else 127), err  # within one step of the new layout


def test_bad_files_are_clear_errors(folder, tmp_path):
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'llama' is not a DeepSeek MoE; nanoseek reads 'deepseek2'"):
        load_pretrained(tmp_path / "llama.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        load_pretrained(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="--gguf 'q2_k' must be one of f32, bf16, q8_0, q4_0"):
        export_gguf(folder, tmp_path / "x.gguf", "q2_k")
    src = make_folder(tmp_path / "freq", moe_layer_freq=2, num_hidden_layers=4)
    with pytest.raises(ValueError, match="moe_layer_freq=2"):
        export_gguf(src, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_tensor_type_names_the_tensor(folder, tmp_path):
    pre = load_pretrained(folder, dtype="float32")
    cfg, state = pre.model.config, pre.model.state_dict()
    w = gguf.GGUFWriter(tmp_path / "f64.gguf", "deepseek2")
    _write_config(w, cfg)
    _write_tokenizer(w, pre.tokenizer, cfg)
    for name, gnames in _names(cfg).items():
        for g, part in zip(gnames, _split(name, state[name].float(), cfg)):
            x = part.contiguous().numpy()
            w.add_tensor(g, x.astype(np.float64) if g == "blk.0.attn_output.weight" else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="tensor blk.0.attn_output.weight has type F64"):
        load_pretrained(tmp_path / "f64.gguf")


def test_quantize_command_then_generate(folder, tmp_path, capsys):
    out = tmp_path / "q4.gguf"
    assert main(["quantize", str(folder), str(out), "--bits", "4"]) == 0
    assert GGUFFile(out).get("general.file_type") == 2
    assert main(["generate", str(out), "--prompt", "1+2=", "--raw", "--max-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "int4 (groups of 32)" in err and "4 tokens" in err


def test_llama_cpp_decodes_the_same_greedy_tokens(folder, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(folder, tmp_path / "m.gguf", "f32")
    ref = load_pretrained(folder, dtype="float32").model
    tok = Tokenizer.load(folder)
    prompt = tok.encode("12+3=<answer>", bos=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        theirs = []
        for t in llm.generate(prompt, temp=0.0, top_k=1):
            theirs.append(t)
            if len(theirs) == 24:
                break
        text = "12+34=<answer>46</answer>"
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    finally:
        llm.close()
    ids, ours = torch.tensor([prompt]), []
    for _ in range(24):
        ours.append(int(logits(ref, ids)[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[ours[-1]]])], dim=1)
    assert theirs == ours
