"""precision="fp8" training (V3's FP8 recipe) and bf16 AdamW moments."""

import json
import shutil

import pytest
import torch

from nanoseek.model.fp8_linear import FP8Experts, FP8Linear
from nanoseek.train.config import load_train_config
from nanoseek.train.loop import resolve_data, train
from nanoseek.train.optim import LowPrecisionAdamW


def losses(run_dir):
    return [r["main"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "main" in r]


@pytest.mark.parametrize("override, message", [
    ("precision=fp4", "precision='fp4' must be one of ('default', 'fp8')"),
    ("fp8_scale_fmt=e8m0", "fp8_scale_fmt='e8m0' must be one of ('fp32', 'ue8m0')"),
    ("optim.moments_dtype=fp16", "optim.moments_dtype='fp16' must be one of ('fp32', 'bf16')"),
    ("precision=fp8 ep=2", "precision='fp8' with ep=2 is not supported"),
])
def test_precision_fields_are_strict(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(None, override.split())


def test_fp8_training_lowers_the_loss_and_tracks_fp32(make_cfg, tmp_path):
    """The same 12 steps (same data, same init) in fp32 and in FP8: both learn, and stay close."""
    runs = {}
    for precision in ("default", "fp8"):
        cfg, shards, _ = resolve_data(make_cfg("steps=12", "optim.lr=5e-3", "eval_every=12", "ckpt_every=12",
                                               f"precision={precision}", out=precision))
        runs[precision] = train(cfg, shards, quiet=True)
    fp8 = runs["fp8"].model
    assert isinstance(fp8.layers[0].self_attn.q_a_proj, FP8Linear) and isinstance(fp8.layers[1].mlp.experts,
                                                                                   FP8Experts)
    assert not isinstance(runs["default"].model.layers[0].self_attn.q_a_proj, FP8Linear)
    a, b = losses(tmp_path / "default"), losses(tmp_path / "fp8")
    assert a[0] == pytest.approx(b[0], rel=1e-2)  # the same model and batch, FP8 GEMMs
    assert sum(b[-3:]) / 3 < sum(b[:3]) / 3 - 0.5
    assert abs(b[-1] - a[-1]) / a[-1] < 0.02


def test_fp8_resume_with_bf16_moments_is_bit_exact(make_cfg, tmp_path):
    """precision=fp8 + optim.moments_dtype=bf16: killed after step 4 and resumed = never stopped, bit for bit."""
    extra = ("precision=fp8", "optim.moments_dtype=bf16", "fp8_scale_fmt=ue8m0")
    cfg, shards, _ = resolve_data(make_cfg(*extra, out="full"))
    full = train(cfg, shards, quiet=True)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "checkpoints" / "step_000008")
    (killed / "checkpoints" / "latest").write_text("step_000004")
    cfg2, _, _ = resolve_data(make_cfg(*extra, out="killed"))
    resumed = train(cfg2, shards, resume=True, quiet=True)
    assert losses(killed) == losses(tmp_path / "full")
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    from safetensors.torch import load_file

    moments = load_file(killed / "checkpoints/step_000008/optimizer.safetensors")
    assert moments["layers.0.self_attn.q_a_proj.weight.exp_avg"].dtype == torch.bfloat16


def test_low_precision_adamw_is_torchs_adamw_with_rounded_moments():
    torch.manual_seed(0)
    params = [torch.randn(16, 8, requires_grad=True) for _ in range(2)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours_fp32 = LowPrecisionAdamW(params, moments_dtype=torch.float32, **kw)
    theirs = torch.optim.AdamW(ref, foreach=False, **kw)
    for _ in range(3):
        grads = [torch.randn(16, 8) for _ in params]
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        ours_fp32.step()
        theirs.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    bf16 = LowPrecisionAdamW(params, moments_dtype=torch.bfloat16, **kw)
    for p in params:
        p.grad = torch.randn(16, 8)
    bf16.step()
    sd = bf16.state_dict()
    bf16.load_state_dict(sd)  # torch casts loaded moments to the parameter dtype; the next step rounds them back
    assert bf16.state[params[0]]["exp_avg"].dtype == torch.float32
    bf16.step()
    assert bf16.state[params[0]]["exp_avg"].dtype == torch.bfloat16
