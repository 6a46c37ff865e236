"""nanoseek.cost and `nanoseek cost`: V3's published numbers, counted FLOPs on tiny models, and input errors."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek.model.moe as moe_module
from nanoseek.kernels import gemm
from nanoseek import ModelConfig, Transformer, cost, peak
from nanoseek.cli import main
from nanoseek.infer.fastpath import Decoder
from nanoseek.config import PRESETS

V3 = ModelConfig.preset("v3-671b")


def cost_json(capsys, *argv) -> dict:
    assert main(["cost", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def values(d: dict, group: str) -> dict:
    return {k: v["value"] for k, v in d[group]["values"].items()}


# ---------------------------------------------------------------------- V3 and the paper
def test_v3_parameters():
    p = V3.num_params()
    assert round(p.total / 1e9) == 671
    assert abs(p.activated - 37e9) <= 1e9


def test_v3_flops_per_token_at_4k():
    f = cost.train_flops_per_token(V3, 4096)
    assert abs(f.total / 250e9 - 1) < 0.05
    assert f.matmul == pytest.approx(6 * 36.62e9, rel=1e-3)  # 6 x 36.62B activated matmul parameters: 219.7 GFLOP
    assert f.attention == pytest.approx(30.7e9, rel=1e-2)
    full = cost.train_flops_per_token(V3, 4096, causal=False)
    assert full.attention == 2 * f.attention and full.matmul == f.matmul
    assert full.total == pytest.approx(281e9, rel=1e-2)


def test_matmul_params_are_activated_minus_embedding_and_norms():
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        p, H = cfg.num_params(), cfg.hidden_size
        norms = cfg.num_hidden_layers * (2 * H + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank) + H
        assert cost.matmul_params(cfg) == p.activated - p.embedding - norms, name
        # MTP adds its matmuls (no norms) and runs the shared head once more
        D = cfg.num_nextn_predict_layers
        mtp_norms = D * (5 * H + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank)
        mtp_total_experts = D * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * H * cfg.moe_intermediate_size
        assert (cost.matmul_params(cfg, mtp=True) - cost.matmul_params(cfg)
                == p.mtp - mtp_norms - mtp_total_experts + D * cfg.vocab_size * H), name


def test_paper_reproduces_table_1(capsys):
    assert main(["cost", "--paper"]) == 0
    text = capsys.readouterr().out
    for line in ("total: GPU-hours (sum of the stages)", "total: cost = GPU-hours x price"):
        row = next(r for r in text.splitlines() if line in r)
        assert row.split()[-1] == "computed"
        assert row.split()[-2] in ("2,788K", "$5.576M")
    d = cost_json(capsys, "--paper")
    paper, ours, llama = values(d, "v3_paper"), values(d, "v3_computed"), values(d, "llama31_405b")
    assert paper["total_hours"] == pytest.approx(2788e3) == paper["total_hours_reported"]
    assert paper["total_cost"] == pytest.approx(5.576e6) == paper["total_cost_reported"]
    assert paper["pretrain_hours"] == pytest.approx(paper["pre_training_hours"])  # 180K x 14.8 = 2,664K
    assert d["v3_paper"]["values"]["total_hours"]["mark"] == "computed"
    assert d["v3_paper"]["values"]["total_hours_reported"]["mark"] == "reported"
    assert abs(ours["flops_per_token"] / 250e9 - 1) < 0.05
    assert ours["total_flops"] == pytest.approx(ours["flops_per_token"] * 14.8e12)
    assert 0.35 < ours["mfu_bf16"] < 0.42  # ~386 TFLOP/s sustained per H800 (from Table 1's GPU-hours)
    assert llama["flops"] == pytest.approx(3.8e25, rel=0.03)
    assert llama["ratio_405b"] == pytest.approx(30.84e6 / 2788e3)
    assert llama["ratio_family"] == pytest.approx(39.3e6 / 2788e3)
    marks = {v["mark"] for g in d.values() for v in g["values"].values()}
    assert marks == {"reported", "computed"}


def test_dense_405b_on_15_6t_tokens(capsys):
    d = cost_json(capsys, "--dense-params", "405e9", "--tokens", "15.6T", "--gpu", "h100", "--mfu", "0.4")
    run = values(d, "run")
    assert run["total_flops"] == pytest.approx(3.8e25, rel=0.03)
    assert run["gpu_hours"] == pytest.approx(run["total_flops"] / (989.5e12 * 0.4 * 3600))
    assert cost.dense_flops_per_token(405e9).total * 15.6e12 == pytest.approx(3.8e25, rel=0.03)


def test_mla_cache_bytes():
    c = cost.cache_bytes_per_token(V3, 2)
    assert c.mla == 70_272 == V3.cache_bytes_per_token(2)
    assert c.mha == 128 * (192 + 128) * 61 * 2  # per-head K (d_n + d_r) and V (d_v), the naive-MLA cache
    assert c.gqa == 8 * (192 + 128) * 61 * 2
    assert c.mla_as_gqa == pytest.approx(1.8) and c.mla_as_gqa_v2 == pytest.approx(2.25)
    assert cost.cache_bytes_per_token(ModelConfig.preset("v2-lite")).mla == 31_104


# ---------------------------------------------------------------------- FLOPs counted on tiny models
@pytest.fixture
def loop_experts(monkeypatch):
    """The per-expert loop, whose mm FLOPs FlopCounterMode counts (it has no formula for grouped_mm), and the
    plain model's SDPA (its math kernel's bmm FLOPs are counted; the CPU flash kernel's are not, and the
    blocked kernel of nanoseek/kernels computes only part of the masked half)."""
    monkeypatch.setattr(moe_module, "grouped_mm_ok", lambda x: False)


def counted(fn) -> dict:
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("overrides", [dict(first_k_dense_replace=3), dict()], ids=["dense", "moe"])
def test_train_flops_match_counted(loop_experts, overrides):
    cfg = ModelConfig.preset("tiny", num_nextn_predict_layers=0, **overrides)
    model, (b, s) = Transformer(cfg), (2, 64)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    c = counted(lambda: model(ids, mtp=False).logits.sum().backward())
    f = cost.train_flops_per_token(cfg, s, causal=False)  # the math SDPA path computes the masked half too
    assert c["aten.mm"] == f.matmul * b * s
    assert c["aten.bmm"] == f.attention * b * s


def test_train_flops_with_mtp_match_counted(loop_experts):
    cfg = ModelConfig.preset("tiny")
    model, (b, s) = Transformer(cfg), (2, 64)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    def step():
        out = model(ids)
        sum(x.sum() for x in [out.logits, *out.mtp_logits]).backward()

    c = counted(step)
    f = cost.train_flops_per_token(cfg, s, causal=False, mtp=True)
    assert sum(c.values()) == pytest.approx(f.total * b * s, rel=0.02)  # MTP runs on s - 1 positions


def test_absorbed_decode_flops_match_counted(loop_experts):
    cfg = ModelConfig.preset("tiny")
    model, t = Transformer(cfg).eval(), 20
    ids = torch.randint(0, cfg.vocab_size, (1, t + 1))
    cache = model.new_cache(batch=1, max_len=t + 1)
    want = cost.inference_flops_per_token(cfg, t + 1, absorbed=True).total
    with torch.no_grad():
        model(ids[:, :t], torch.arange(t)[None], cache)
        assert sum(counted(lambda: model(ids[:, t:], torch.tensor([[t]]), cache)).values()) == want
        # the decoding plan (infer/fastpath) also runs RoPE (q's h heads and k: one product with the row's d_r x
        # d_r rotation) and the routed experts' weighted sum as matmuls; neither is a model FLOP
        c = counted(lambda: Decoder(model)(ids[:, t:], torch.tensor([[t]]), cache))
    L, moe, dr = cfg.num_hidden_layers, cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.qk_rope_head_dim
    plan = L * 2 * (cfg.num_attention_heads + 1) * dr * dr + moe * 2 * cfg.num_experts_per_tok * cfg.hidden_size
    assert sum(c.values()) - plan == want


# ---------------------------------------------------------------------- runs, hardware, parsing
def test_mfu_and_gpu_hours_agree():
    f, tps, peak = 250e9, 1500.0, 989.5e12
    m = cost.mfu(f, tps, peak)
    assert m == pytest.approx(f * tps / peak)
    assert cost.gpu_hours(f * 14.8e12, peak, m) == pytest.approx(14.8e12 / tps / 3600)
    r = cost.run_compute(f, 1e9, seconds=3600, devices=2, price_per_hour=3.0,
                         peak=cost.Peak(peak, "datasheet", "NVIDIA H200 SXM bf16 dense"))
    assert r["device_hours"] == 2 and r["cost"] == 6 and r["flops"] == f * 1e9
    assert r["mfu"] == pytest.approx(f * 1e9 / (2 * 3600 * peak))
    assert r["peak"] == "990 TFLOP/s (datasheet, NVIDIA H200 SXM bf16 dense)"  # report.md names the peak


def test_gpu_table():
    assert set(peak.GPUS) == {"a100", "cpu", "h100", "h200", "h800"}
    assert peak.GPUS["h800"].peaks == peak.GPUS["h100"].peaks == peak.GPUS["h200"].peaks
    assert peak.GPUS["h800"].peaks == {"bf16": 989.5e12, "fp8": 1979e12}
    assert peak.GPUS["a100"].peaks == {"bf16": 312e12}
    for name, gpu in peak.GPUS.items():
        assert ("measured" if name == "cpu" else "datasheet") in gpu.source


def test_measure_gemm_peak_counts_2n3_flops_per_timed_product(monkeypatch):
    """With a clock that advances 0.25 s per reading, every timed product takes 0.25 s: the peak is 2 n^3 / 0.25
    for the largest n (the warm-up products are not timed)."""
    ticks = iter(range(10_000))
    monkeypatch.setattr(gemm.time, "perf_counter", lambda: next(ticks) * 0.25)
    assert peak.measure_gemm_peak(sizes=(64, 128), repeats=2) == 2 * 128**3 / 0.25


def test_cpu_throughput_gives_mfu(capsys, monkeypatch):
    monkeypatch.setattr(peak, "measure_gemm_peak", lambda: 1e11)
    d = cost_json(capsys, "--preset", "small", "--seq-len", "512", "--gpu", "cpu", "--tokens-per-second", "100",
                  "--tokens", "1M")
    run = d["run"]["values"]
    assert run["peak_flops"]["mark"] == "measured" and run["peak_flops"]["value"] == 1e11
    f = cost.train_flops_per_token(ModelConfig.preset("small"), 512).total
    assert run["mfu"]["value"] == pytest.approx(f * 100 / 1e11)
    assert run["gpu_hours"]["value"] == pytest.approx(1e6 / 100 / 3600)


@pytest.mark.parametrize("text,value", [("14.8T", 14.8e12), ("500B", 500e9), ("2.5m", 2.5e6), ("1K", 1e3),
                                        ("1000", 1e3), ("405e9", 405e9), (3, 3.0)])
def test_parse_tokens(text, value):
    assert cost.parse_tokens(text) == pytest.approx(value)


def test_config_file_and_overrides(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ModelConfig.preset("nano").to_hf_dict()))
    from_file = values(cost_json(capsys, "--config", str(path)), "model")
    assert from_file == values(cost_json(capsys, "--preset", "nano"), "model")
    wider = values(cost_json(capsys, "--preset", "nano", "hidden_size=384"), "model")
    assert wider["params_total"] > from_file["params_total"]


def test_text_table(capsys):
    assert main(["cost", "--preset", "v3-671b", "--tokens", "14.8T", "--gpu", "h800", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "70,272 B" in out and "250.4 GFLOP" in out and "$2 per GPU-hour" in out
    rows = [r for r in out.splitlines() if r.startswith("  ")]
    assert len({len(r) - len(r.split()[-1]) for r in rows}) == 1  # the mark column is aligned


@pytest.mark.parametrize("argv,message", [
    (["--preset", "v3-671b", "--tokens", "-5"], "--tokens -5 must be a positive number"),
    (["--preset", "v3-671b", "--tokens", "lots"], "--tokens lots is not a number"),
    (["--preset", "v3-671b", "--gpu", "xyz"], "--gpu xyz is unknown; choose one of a100, cpu, h100, h200, h800"),
    (["--preset", "v3-671b", "--mfu", "1.5"], "--mfu 1.5 is not in (0, 1]"),
    (["--preset", "v3-671b", "--mfu", "0"], "--mfu 0 is not in (0, 1]"),
    (["--preset", "v3-671b", "--mfu", "high"], "--mfu high is not a number"),
    (["--preset", "v3-671b", "--gpu", "a100", "--precision", "fp8"], "--precision fp8 is not available on a100"),
    (["--preset", "v3-671b", "--seq-len", "0"], "--seq-len 0 must be a positive integer"),
    (["--preset", "v3-671b", "--mfu", "0.4", "--tokens-per-second", "10"], "--mfu or --tokens-per-second"),
    (["--preset", "v3-671b", "--gpu", "a100", "--tokens-per-second", "1e6"], "implies MFU"),
    (["--preset", "xl"], "unknown preset 'xl'"),
    (["--tokens", "1T"], "give exactly one of --preset"),
    (["--preset", "nano", "--dense-params", "1e9"], "got --preset and --dense-params"),
    (["--dense-params", "-1"], "--dense-params -1 must be a positive number"),
    (["--config", "/nonexistent/config.json"], "no such file"),
    (["--paper", "--preset", "nano"], "--paper takes no model or run options"),
])
def test_bad_inputs(capsys, argv, message):
    assert main(["cost", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek cost: error: ") and message in err
