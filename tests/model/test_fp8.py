import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek.hf import load_pretrained
from nanoseek.model.fp8 import E4M3_MAX, dequantize_blockwise, quantize_blockwise


def test_blockwise_round_trip_error_is_bounded_per_block():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different magnitude
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize_blockwise(q, s)
    rel = (back - w).abs() / s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] / E4M3_MAX
    assert rel.max() <= 2 ** -4  # e4m3 keeps 3 mantissa bits: error <= half an ulp of the block's range
    assert (q.float().abs().amax() <= E4M3_MAX)
    with pytest.raises(ValueError, match="needs block scales of shape"):
        dequantize_blockwise(q, s[:1])


def test_an_fp8_checkpoint_in_v3_format_loads_dequantized(tiny_run, tmp_path):
    run, _ = tiny_run
    hf = tmp_path / "hf"
    from nanoseek.cli import main
    main(["export", str(run), str(hf)])
    sd = load_file(hf / "model.safetensors")
    fp8 = {}
    for k, v in sd.items():  # V3 quantizes the linear layers; embeddings, norms, gates stay as they are
        if v.dim() == 2 and k.endswith("proj.weight"):
            fp8[k], fp8[k + "_scale_inv"] = quantize_blockwise(v, block=16)
        else:
            fp8[k] = v
    save_file(fp8, hf / "model.safetensors")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16],
                                  "activation_scheme": "dynamic"}
    (hf / "config.json").write_text(json.dumps(cfg))
    ours, loaded = load_pretrained(run).model, load_pretrained(hf).model
    w, w8 = ours.layers[0].self_attn.q_a_proj.weight, loaded.layers[0].self_attn.q_a_proj.weight
    assert w8.dtype == torch.float32 and 0 < (w8 - w).abs().max() <= w.abs().max() / 16
    assert torch.equal(w8, dequantize_blockwise(*quantize_blockwise(w, block=16), block=16))  # exactly V3's rule
    e = ours.layers[1].mlp.experts.gate_up_proj[3]  # stacked from per-expert FP8 keys
    I = e.shape[0] // 2
    want = torch.cat([dequantize_blockwise(*quantize_blockwise(e[:I], block=16), block=16),
                      dequantize_blockwise(*quantize_blockwise(e[I:], block=16), block=16)])
    assert torch.equal(loaded.layers[1].mlp.experts.gate_up_proj[3], want)
    assert torch.equal(loaded.embed_tokens.weight, ours.embed_tokens.weight)  # not quantized
    plain = tmp_path / "plain"  # `nanoseek import`: the FP8 folder as a dequantized fp32 one
    assert main(["import", str(hf), str(plain)]) == 0
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    assert torch.equal(load_pretrained(plain).model.layers[0].self_attn.q_a_proj.weight, w8)
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="is not DeepSeek's blockwise FP8"):
        load_pretrained(bad)
