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


# ---------------------------------------------------------------------- quantization (DeepSeek-V3 report §3.3.2)
from nanoseek.model.fp8 import FP8_WEIGHTS, block_scale, fake_quantize  # noqa: E402
from nanoseek.model.fp8_linear import (FP8Experts, FP8Linear, Operand, Recipe, fp8_grouped_mm,  # noqa: E402
                                       fp8_linear, gemm, quantize_operand, to_fp8)


def _per_element_scale(s, shape, block):
    return s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_error_bound_and_edge_blocks(block, scale_fmt):
    """200 x 300 (no multiple of 128): partial edge blocks take the scale of the elements they have, exactly
    what zero-padding to 256 x 384 gives (V3's checkpoint rule). E4M3 keeps 3 mantissa bits: per element
    |x - dq(q(x))| <= 2^-4 |x| (normal range) + 2^-10 s (subnormal step 2^-9 s, halved)."""
    x = torch.randn(200, 300) * torch.logspace(-2, 2, 300)  # columns of very different magnitude
    q, s = quantize_blockwise(x, block, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-200 // block[0]), 3)
    back = dequantize_blockwise(q, s, block)
    s_el = _per_element_scale(s, x.shape, block)
    assert ((back - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * s_el).all()
    amax = torch.stack([torch.stack([b.abs().max() for b in row.split(block[1], 1)]) for row in x.split(block[0])])
    assert torch.equal(s, block_scale(amax, scale_fmt))  # s = amax / 448 per block [rounded up to 2^k]
    padded = torch.nn.functional.pad(x, (0, 84, 0, 56))
    qp, sp = quantize_blockwise(padded, block, scale_fmt)
    assert torch.equal(sp[: s.shape[0]], s) and torch.equal(qp[:200, :300].float(), q.float())


def test_ue8m0_scales_are_powers_of_two_and_cover_the_block():
    x = torch.randn(64, 512) * 3
    q, s = quantize_blockwise(x, (1, 128), "ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    amax = x.abs().view(64, 4, 128).amax(-1)
    assert (amax / s <= E4M3_MAX).all() and (amax / s > E4M3_MAX / 2).all()  # the smallest 2^k that fits
    assert torch.equal(block_scale(amax, "fp32"), amax / E4M3_MAX)
    assert (block_scale(torch.zeros(3)) == 1e-4 / E4M3_MAX).all()  # V3's act_quant floor
    assert (block_scale(torch.zeros(3), amax_floor=0.0) == torch.finfo(torch.float32).tiny).all()  # gradients
    with pytest.raises(ValueError, match="scale_fmt='e8m0' must be one of"):
        quantize_blockwise(x, 128, "e8m0")


def test_an_outlier_spoils_only_its_own_block():
    """Fine-grained scaling's point (paper 3.3.2): one outlier coarsens its own 1x128 tile (or 128x128 block)
    only; with one scale per tensor it pushes every other value toward the subnormals."""
    x = torch.randn(256, 256)
    spiked = x.clone()
    spiked[5, 7] = 1e5  # 2^17 x the neighbours; e4m3 spans 448 / 2^-9 ~ 2^18 (normals only 448 / 2^-6)
    for block, own in (((1, 128), (slice(5, 6), slice(0, 128))), ((128, 128), (slice(0, 128), slice(0, 128)))):
        err = (fake_quantize(spiked, block) - spiked).abs()
        clean = (fake_quantize(x, block) - x).abs()
        rest = torch.ones_like(x, dtype=torch.bool)
        rest[own] = False
        assert torch.equal(err[rest], clean[rest])  # neighbours: exactly as without the outlier
        assert err[rest].max() <= 2 ** -4 * x.abs().max()
    per_tensor = (fake_quantize(spiked, 256) - spiked).abs()  # one 256 x 256 block = per-tensor scaling
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[5, 7] = False
    fine = (fake_quantize(spiked, (1, 128)) - spiked).abs()
    assert (per_tensor[rest] / x[rest].abs()).median() > 5 * (fine[rest] / x[rest].abs()).median()
    assert (fake_quantize(spiked, 256)[rest] == 0).float().mean() > 0.1  # flushed to zero: lost entirely


# ---------------------------------------------------------------------- FP8 GEMMs
def _linear_reference(x, w, g, b=128):
    """The three V3 GEMMs written out: fake-quantize the operands as the recipe says, multiply in fp32."""
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    xq = fake_quantize(x2, (1, b))
    wq = fake_quantize(w, b)
    y = xq @ wq.T
    dx = fake_quantize(g2, (1, b), amax_floor=0.0) @ wq  # Dgrad: dY tiles along out
    dw = fake_quantize(g2.T, (1, b), amax_floor=0.0) @ fake_quantize(xq.T, (1, b)).T  # Wgrad: along tokens
    return y.view(*x.shape[:-1], -1), dx.view(x.shape), dw


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_linear_equals_the_reference_in_all_three_gemms(scale_fmt):
    x = torch.randn(3, 70, 300, requires_grad=True)
    w = (torch.randn(200, 300) * 0.05).requires_grad_()
    y = fp8_linear(x, w, Recipe(scale_fmt=scale_fmt, backend="emulate"))
    g = torch.randn_like(y) * 1e-6  # a small gradient: no amax floor may swallow it
    y.backward(g)
    if scale_fmt == "fp32":
        ry, rdx, rdw = _linear_reference(x.detach(), w.detach(), g)
        for got, want in ((y, ry), (x.grad, rdx), (w.grad, rdw)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    exact = (x.detach() @ w.detach().T, g @ w.detach(), g.reshape(-1, 200).T @ x.detach().reshape(-1, 300))
    for got, want in zip((y, x.grad, w.grad), exact):  # and FP8 stays within a few % of the fp32 product
        assert (got - want).norm() / want.norm() < 0.06
    with pytest.raises(ValueError, match="do not fit"):
        fp8_linear(x, w.T)


def test_fp8_linear_under_autocast_gives_bf16_out_and_fp32_grads():
    x = torch.randn(8, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_fp8_grouped_mm_equals_one_fp8_linear_per_expert():
    """The routed experts: per expert 128x128 weight blocks (gate and up quantized apart), per token 1x128
    tiles, Wgrad tiles restarting at each expert's first token: one fp8_linear per expert, empty ones too."""
    r = Recipe(block=16, backend="emulate")
    E, I, H = 4, 32, 48
    counts = torch.tensor([21, 0, 40, 3])
    xs = torch.randn(int(counts.sum()), H, requires_grad=True)
    w = torch.randn(E, 2 * I, H, requires_grad=True)
    y = fp8_grouped_mm(xs, w, counts, r, parts=2)
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = xs.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ys, start = [], 0
    for e, n in enumerate(counts.tolist()):
        rows = xr[start:start + n]
        ys.append(torch.cat([fp8_linear(rows, wr[e, :I], r), fp8_linear(rows, wr[e, I:], r)], dim=1))
        start += n
    ref = torch.cat(ys)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-6, atol=1e-5)
    assert (w.grad[1] == 0).all()


def test_to_fp8_converts_the_set_v3_quantizes_and_trains():
    from tests.conftest import tiny_model

    model = tiny_model().train()
    ref = tiny_model().train()
    names = list(model.state_dict())
    to_fp8(model)
    assert list(model.state_dict()) == names  # same parameters, same checkpoint names
    fp8 = {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    assert "layers.0.self_attn.kv_b_proj" in fp8 and "layers.0.mlp.down_proj" in fp8
    assert "layers.1.mlp.shared_experts.up_proj" in fp8 and "layers.1.mlp.experts" in fp8
    assert "mtp.0.self_attn.o_proj" in fp8 and "mtp.0.mlp.experts" in fp8
    kept = {"lm_head", "mtp.0.eh_proj", "layers.1.mlp.gate", "embed_tokens", "norm"}
    assert not kept & fp8
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    a, b = model(ids).logits, ref(ids).logits
    assert 0 < (a - b).norm() / b.norm() < 0.05
    out = model(ids, labels=ids)
    (out.loss + sum(out.mtp_losses)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()), \
        [n for n, p in model.named_parameters() if p.grad is None]
    with torch.no_grad():  # decoding's few-rows expert path is FP8 too
        model.eval()(ids[:1, :3])


def test_scaled_mm_arguments_pass_torchs_layout_checks():
    """No GPU here: run the scaled_mm branch of `gemm` on fake CUDA tensors, so torch's own shape and stride
    checks for F.scaled_mm (BlockWise1x128 x BlockWise128x128, and 1x128 x 1x128 for Wgrad) see our layout."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()

    def cuda(*shape, dtype=torch.float32):
        return FakeTensor(mode, torch.empty(*shape, dtype=dtype, device="meta"), torch.device("cuda"))

    f8 = torch.float8_e4m3fn
    t, n, k = 256, 384, 640
    with mode:
        x = Operand(cuda(t, k, dtype=f8), cuda(t, k // 128), (1, 128))
        w = Operand(cuda(n, k, dtype=f8), cuda(n // 128, k // 128), (128, 128))
        g = Operand(cuda(t, n, dtype=f8), cuda(t, n // 128), (1, 128))
        assert gemm(x, w, scaled_mm=True).shape == (t, n)  # Fprop
        assert gemm(g, w.t(), scaled_mm=True).shape == (t, k)  # Dgrad
        gt = Operand(cuda(n, t, dtype=f8), cuda(n, t // 128), (1, 128))
        xt = Operand(cuda(k, t, dtype=f8), cuda(k, t // 128), (1, 128))
        assert gemm(gt, xt, scaled_mm=True).shape == (n, k)  # Wgrad


def test_scaled_mm_backend_needs_hopper():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: test_scaled_mm_matches_emulation covers it")
    with pytest.raises(ValueError, match="backend='scaled_mm' needs block 128 and a CUDA GPU"):
        fp8_linear(torch.randn(4, 128), torch.randn(128, 128), Recipe(backend="scaled_mm"))


@pytest.mark.gpu
def test_scaled_mm_matches_emulation():
    """On Hopper the auto backend runs F.scaled_mm; it must give the emulation's products (bf16 output)."""
    from nanoseek.model.fp8_linear import uses_scaled_mm

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: F.scaled_mm's blockwise FP8 kernels need an SM90 GPU")
    x = torch.randn(200, 300, device="cuda")
    if not uses_scaled_mm(Recipe(), x):
        pytest.skip(f"blockwise F.scaled_mm does not run on {torch.cuda.get_device_name()} (needs SM90)")
    w = torch.randn(150, 300, device="cuda") * 0.05
    g = torch.randn(200, 150, device="cuda") * 1e-3
    out = {}
    for backend in ("scaled_mm", "emulate"):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xa, wa, Recipe(backend=backend))
        y.backward(g)
        out[backend] = (y, xa.grad, wa.grad)
    for got, want in zip(out["scaled_mm"], out["emulate"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


# ---------------------------------------------------------------------- export in V3's FP8 format
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_export_is_v3_format_and_loads_back(tiny_run, tmp_path, scale_fmt):
    from nanoseek.cli import main

    run, _ = tiny_run
    out = tmp_path / "fp8"
    assert main(["export", str(run), str(out), "--fp8", "--scale-fmt", scale_fmt]) == 0
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                     "weight_block_size": [128, 128], **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {})}
    sd = load_file(out / "model.safetensors")
    ours = load_pretrained(run).model
    plain = ours.hf_state_dict()
    assert set(sd) == set(plain) | {k + "_scale_inv" for k in plain if FP8_WEIGHTS.search(k)}
    for key, w in plain.items():
        if FP8_WEIGHTS.search(key):
            s = sd[key + "_scale_inv"]
            assert sd[key].dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
            assert torch.equal(dequantize_blockwise(sd[key], s), fake_quantize(w, 128, scale_fmt))
        elif not key.endswith("e_score_correction_bias"):  # (biases are shifted to min 0 by every export)
            assert torch.equal(sd[key], w), key
    L = ours.config.num_hidden_layers
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                f"model.layers.{L}.eh_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert key in sd and key + "_scale_inv" not in sd  # V3 keeps these in high precision
    back = load_pretrained(out).model
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = back(ids).logits, ours(ids).logits
    # within the weights' quantization error (0.04-0.055 over seeds; a wrong scale or layout gives ~1)
    assert 0 < (a - b).norm() / b.norm() < 0.08


def test_transformers_reads_our_fp8_export(tiny_run, tmp_path):
    """transformers 5.24 reads V3's FP8 format through its FineGrainedFP8 quantizer; on a CPU it dequantizes
    the weights (no FP8 kernels without a GPU), and the logits equal our own dequantized load."""
    transformers = pytest.importorskip("transformers")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        pytest.skip("transformers 5.24 loads FP8 checkpoints only through FineGrainedFP8HfQuantizer, whose "
                    "validate_environment raises ImportError without the `accelerate` package (not installed "
                    "here); with accelerate 1.15 it dequantizes on CPU and the logits match ours")
    from nanoseek.cli import main

    run, _ = tiny_run
    out = tmp_path / "fp8"
    main(["export", str(run), str(out), "--fp8"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    assert ref.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32  # dequantized
    ours = load_pretrained(out).model
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_fp8_model_steps_under_bf16_autocast():
    """precision=fp8 with dtype=bf16 (the CUDA default of FP8 runs): the experts' bf16 output meets the fp32
    residual stream without a dtype clash, and the step is finite."""
    from nanoseek import ModelConfig, Transformer
    from nanoseek.model.fp8_linear import to_fp8

    model = to_fp8(Transformer(ModelConfig.preset("tiny")))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
