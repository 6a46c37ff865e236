"""hf.load_pretrained at real sizes: built on the meta device, filled tensor by tensor, equal to the plain path
(random init, whole state dict, copy, cast); the peak memory of a load, measured in a subprocess."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import Transformer
from nanoseek.config import yarn_example
from nanoseek.hf import load_pretrained, locate
from nanoseek.quant import Spec, quantize
from tests.conftest import tiny_model


def save_hf(model: Transformer, out, dtype=torch.float32, shard_bytes: int | None = None, drop=()) -> dict:
    """`model` as a Hugging Face folder (config.json + safetensors in `dtype`, sharded past shard_bytes with an
    index). Returns the saved tensors."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.hf_state_dict().items() if k not in drop}
    (out / "config.json").write_text(json.dumps({**model.config.to_hf_dict(),
                                                 "torch_dtype": str(dtype).removeprefix("torch.")}))
    if shard_bytes is None:
        save_file(sd, out / "model.safetensors")
        return sd
    shards, size = [[]], 0
    for k, v in sd.items():
        if shards[-1] and size + v.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += v.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        save_file({k: sd[k] for k in keys}, out / name)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}))
    return sd


def plain_load(path, dtype) -> Transformer:
    """The loader nanoseek had before: fp32 random init, every tensor in one dict, copy, then cast."""
    _, weights, cfg = locate(path)
    tensors = {}
    for f in sorted(weights.glob("*.safetensors")):
        tensors.update(load_file(f))
    model = Transformer(cfg)
    model.load_hf_state_dict(tensors)
    return model.to(dtype=dtype).eval()


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return [out.logits, *out.mtp_logits]


@pytest.mark.parametrize("saved,loaded", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("yarn", [False, True])
def test_streamed_load_equals_the_plain_path(tmp_path, saved, loaded, yarn):
    overrides = dict(rope_scaling=yarn_example(64, 4.0), max_position_embeddings=256) if yarn else {}
    model = tiny_model(**overrides)  # MTP depth 1, random negative router biases
    save_hf(model, tmp_path, saved, shard_bytes=200_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    new = load_pretrained(tmp_path, dtype=None if saved == loaded else loaded).model
    old = plain_load(tmp_path, loaded)
    assert new.embed_tokens.weight.dtype == loaded and new.config.num_nextn_predict_layers == 1
    assert new.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert all(not t.is_meta for t in new.state_dict().values())
    for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, model.config.vocab_size, (2, 100 if yarn else 20))
    for a, b in zip(outputs(new, ids), outputs(old, ids), strict=True):  # logits and MTP logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("loaded", [torch.float32, torch.bfloat16])
def test_fp8_checkpoints_dequantize_tensor_by_tensor(tmp_path, loaded):
    """V3's FP8 format (e4m3 + `weight_scale_inv` per block, here 16 x 16) equals dequantizing the whole
    checkpoint in fp32 first, then casting, as the plain path did."""
    from nanoseek.model.fp8 import dequantize_blockwise, quantize_checkpoint

    model = tiny_model()
    sd = quantize_checkpoint(save_hf(model, tmp_path), block=16)
    save_file(sd, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = {k: dequantize_blockwise(v, sd[k + "_scale_inv"], 16) if k + "_scale_inv" in sd else v
             for k, v in sd.items() if not k.endswith("_scale_inv")}
    old = Transformer(model.config)
    old.load_hf_state_dict(plain)
    new = load_pretrained(tmp_path, dtype=loaded).model
    for (name, a), (_, b) in zip(new.state_dict().items(), old.to(loaded).state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_stacked_expert_keys_load(tmp_path):
    """transformers >= 5 saves the routed experts stacked, under nanoseek's own names."""
    model = tiny_model()
    sd = save_hf(model, tmp_path)
    stacked = {k: v for k, v in sd.items() if ".experts." not in k}
    for name, t in model.state_dict().items():
        if ".experts." in name:
            stacked[f"model.{name}"] = t.clone()
    save_file(stacked, tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path).model
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_an_absent_router_bias_starts_at_zero(tmp_path, capfd):
    model = tiny_model()
    save_hf(model, tmp_path, drop={"model.layers.1.mlp.gate.e_score_correction_bias"})
    loaded = load_pretrained(tmp_path).model
    assert torch.equal(loaded.layers[1].mlp.gate.e_score_correction_bias, torch.zeros(8))
    assert torch.equal(loaded.layers[2].mlp.gate.e_score_correction_bias, model.layers[2].mlp.gate.e_score_correction_bias)
    assert "lacks 1 buffers" in capfd.readouterr().err


def test_the_memory_a_load_needs_is_printed_and_checked(tmp_path, capfd, monkeypatch):
    save_hf(tiny_model(), tmp_path, torch.bfloat16)
    load_pretrained(tmp_path)
    err = capfd.readouterr().err
    assert err.count("nanoseek: loading") == 1 and "parameters in bfloat16" in err and "GiB RAM" in err
    monkeypatch.setattr("nanoseek.hf.available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"the model needs 0.00 GiB of RAM \(\d+.\d+K parameters in "
                                         r"bfloat16.*but only 0.00 GiB is available; load it quantized"):
        load_pretrained(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    save_hf(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match="has no usable CUDA GPU"):
        load_pretrained(tmp_path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_streams_to_the_gpu(tmp_path):
    model = tiny_model()
    save_hf(model, tmp_path, torch.bfloat16, shard_bytes=200_000)
    new = load_pretrained(tmp_path, device="cuda").model
    assert new.embed_tokens.weight.is_cuda and new.embed_tokens.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(new.state_dict().items(), plain_load(tmp_path, torch.bfloat16).state_dict().items()):
        assert torch.equal(a.cpu(), b), name


PEAK = textwrap.dedent("""
    import sys, torch
    from nanoseek.hf import load_pretrained

    def peak_rss():  # VmHWM: ru_maxrss would start at the parent's peak (it survives fork and exec)
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

    load_pretrained(sys.argv[1])  # warm-up: the code path, allocator and imports outside the measurement
    base = peak_rss()
    model = load_pretrained(sys.argv[2]).model
    print(peak_rss() - base, {p.dtype for p in model.parameters()} == {torch.bfloat16})
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_a_bf16_load_holds_no_fp32_copy(tmp_path):
    """Peak RSS above the process's own baseline < 1.3x the checkpoint's bytes + 8 MiB: a fp32 copy of the
    model (2x the bf16 bytes) or a second copy of the checkpoint would exceed it."""
    warm, big = tmp_path / "warm", tmp_path / "big"
    save_hf(tiny_model(), warm, torch.bfloat16)
    torch.manual_seed(0)
    model = Transformer(tiny_model().config.replace(vocab_size=32768, hidden_size=256, num_attention_heads=4))
    sd = save_hf(model, big, torch.bfloat16, shard_bytes=12 << 20)
    nbytes = sum(v.nbytes for v in sd.values())  # MTP's copies of the embedding and head included
    weights = sum(p.nbytes for p in model.parameters()) // 2
    assert nbytes > 40 << 20 and len(list(big.glob("*.safetensors"))) >= 3
    out = subprocess.run([sys.executable, "-c", PEAK, str(warm), str(big)], capture_output=True, text=True,
                         check=True)
    above, bf16 = out.stdout.split()
    assert bf16 == "True"
    assert int(above) < 1.3 * weights + (8 << 20), (int(above) / 2**20, weights / 2**20)


@pytest.mark.parametrize("spec", [Spec(8), Spec(4, 32)], ids=lambda s: s.name)
@pytest.mark.parametrize("form", ["shards", "fp8", "stacked"])
def test_a_quantized_load_equals_quantizing_the_loaded_model(tmp_path, spec, form):
    """Each weight quantized as it streams (hf._fill's staging) = the whole model loaded, then quantized: in
    shards, from V3's FP8 format (no bf16 copy of the model) and from stacked expert keys."""
    model = tiny_model()
    sd = save_hf(model, tmp_path, torch.bfloat16, shard_bytes=200_000 if form == "shards" else None)
    if form == "fp8":
        from nanoseek.model.fp8 import quantize_checkpoint

        save_file(quantize_checkpoint({k: v.float() for k, v in sd.items()}, block=16), tmp_path / "model.safetensors")
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
        (tmp_path / "config.json").write_text(json.dumps(config))
    elif form == "stacked":
        stacked = {k: v for k, v in sd.items() if ".experts." not in k}
        stacked.update({f"model.{n}": t.to(torch.bfloat16) for n, t in model.state_dict().items() if ".experts." in n})
        save_file(stacked, tmp_path / "model.safetensors")
    streamed = load_pretrained(tmp_path, quantize=spec).model
    whole = quantize(load_pretrained(tmp_path).model, spec)
    a, b = streamed.state_dict(), whole.state_dict()
    assert sorted(a) == sorted(b) and any(k.endswith("experts.gate_up_proj_7_q") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_quantize_off_the_cpu_is_a_clear_error(tmp_path):
    save_hf(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match="runs on torch's CPU kernels; device cuda"):
        load_pretrained(tmp_path, device="cuda", quantize=Spec(8))


QUANTIZED_PEAK = textwrap.dedent("""
    import sys, torch
    from nanoseek.hf import load_pretrained
    from nanoseek.quant import Spec, nbytes

    def peak_rss():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

    load_pretrained(sys.argv[1], quantize=Spec(4, 32))  # warm-up, as in PEAK
    base = peak_rss()
    model = load_pretrained(sys.argv[2], quantize=Spec(4, 128)).model
    print(peak_rss() - base, nbytes(model))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_a_quantized_load_holds_one_weight_in_high_precision(tmp_path):
    """Loading a bf16 checkpoint as int4: peak RSS above the baseline < 1.3x the quantized model's bytes + the
    largest weight in bf16 (the one being gathered and quantized) + 8 MiB; the bf16 model is 2.4x that."""
    warm, big = tmp_path / "warm", tmp_path / "big"
    save_hf(tiny_model(), warm, torch.bfloat16)
    torch.manual_seed(0)
    cfg = tiny_model().config.replace(vocab_size=2048, hidden_size=512, moe_intermediate_size=512, n_routed_experts=16,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                      intermediate_size=1024,
                                      q_lora_rank=128, kv_lora_rank=128)
    model = Transformer(cfg)
    sd = save_hf(model, big, torch.bfloat16, shard_bytes=16 << 20)
    bf16 = sum(v.nbytes for v in sd.values())
    largest = max(p.numel() for p in model.parameters()) * 2
    out = subprocess.run([sys.executable, "-c", QUANTIZED_PEAK, str(warm), str(big)], capture_output=True, text=True,
                         check=True)
    above, quantized = (int(v) for v in out.stdout.split())
    assert bf16 > 2 * (quantized + largest)
    assert above < 1.3 * quantized + largest + (8 << 20), (above / 2**20, quantized / 2**20, largest / 2**20)


def test_every_buffer_starts_at_zero():
    """The loader sets the buffers of a model it builds on the meta device to zero (gguf_io.materialize): true of
    every buffer of a fresh model, and each is in the state dict (none is computed at init and left out)."""
    model = Transformer(tiny_model().config)
    names = [n for n, _ in model.named_buffers()]
    assert names and all(n in model.state_dict() for n in names)
    assert all(not b.any() for b in model.buffers())
