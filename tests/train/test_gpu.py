"""The training loop on a CUDA GPU (skipped without one): the `small` preset in bf16 autocast tracks fp32, and
V3's FP8 recipe through F.scaled_mm (the model-level path; tests/model/test_fp8.py checks the kernel
against its emulation) tracks bf16. MFU there is against the datasheet's peak."""

import json
from pathlib import Path

import pytest
import torch

from nanoseek.train.loop import resolve_data, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def steps(make_cfg, name, *overrides) -> list[dict]:
    cfg, shards, _ = resolve_data(make_cfg("preset=small", "device=cuda", "steps=4", "data.seq_len=128",
                                           "optim.lr=3e-3", "eval_every=4", "ckpt_every=4", *overrides, out=name))
    train(cfg, shards, quiet=True)
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "main" in r]


def test_bf16_training_of_small_tracks_fp32(make_cfg):
    fp32, bf16 = steps(make_cfg, "fp32", "dtype=fp32"), steps(make_cfg, "bf16", "dtype=bf16")
    assert len(fp32) == len(bf16) == 4
    for a, b in zip(fp32, bf16):
        assert b["main"] == pytest.approx(a["main"], rel=2e-2), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.1), a["step"]
        assert 0 <= a["mfu"] <= 1 and 0 <= b["mfu"] <= 1  # against the datasheet peak
    assert fp32[-1]["main"] < fp32[0]["main"] and bf16[-1]["main"] < bf16[0]["main"]


def test_fp8_training_through_scaled_mm_tracks_bf16(make_cfg):
    from nanoseek.model.fp8_linear import Recipe, uses_scaled_mm

    if not uses_scaled_mm(Recipe(), torch.zeros(1, device="cuda")):
        pytest.skip(f"blockwise F.scaled_mm does not run on {torch.cuda.get_device_name()} (needs SM90)")
    bf16, fp8 = steps(make_cfg, "bf16", "dtype=bf16"), steps(make_cfg, "fp8", "dtype=bf16", "precision=fp8")
    for a, b in zip(bf16, fp8):
        assert b["main"] == pytest.approx(a["main"], rel=5e-2), a["step"]
    assert fp8[-1]["main"] < fp8[0]["main"]
